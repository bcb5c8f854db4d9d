import Foundation
import Logging
import ServiceLifecycle
import Testing

@testable import OAIToCircuit

#if canImport(Glibc)
import Glibc
#endif

/// The sd_notify datagrams, received on a test socket as systemd would.
@Suite(.timeLimit(.minutes(1))) struct SystemdNotifierTests {
    /// A bound Unix datagram socket; `receive()` waits up to 10 s for the next message.
    final class NotifySocket: Sendable {
        let descriptor: Int32
        let name: String

        /// `abstract`: in Linux's abstract namespace, named `@…` in NOTIFY_SOCKET.
        init(path: String, abstract: Bool) throws {
            let descriptor = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            var bytes = Array(path.utf8)
            if abstract { bytes.insert(0, at: 0) }
            withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
            let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, length) }
            }
            var timeout = timeval(tv_sec: 10, tv_usec: 0)
            setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            guard bound == 0 else {
                close(descriptor)
                throw POSIXError(.EADDRINUSE)
            }
            self.descriptor = descriptor
            name = abstract ? "@" + path : path
        }

        deinit { close(descriptor) }

        /// The next datagram, read on a thread of its own (never on the concurrency pool); `nil` after 10 s.
        func receive() async -> String? {
            await withCheckedContinuation { continuation in
                DispatchQueue.global().async {
                    var buffer = [UInt8](repeating: 0, count: 4096)
                    let count = recv(self.descriptor, &buffer, buffer.count, 0)
                    continuation.resume(returning: count < 0 ? nil : String(decoding: buffer.prefix(count), as: UTF8.self))
                }
            }
        }
    }

    @Test(arguments: [false, true]) func readyWatchdogAndStopping(abstract: Bool) async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = abstract ? "oai-to-circuit-test-\(UUID().uuidString)" : directory.appendingPathComponent("notify").path
        let socket = try NotifySocket(path: path, abstract: abstract)
        let notifier = SystemdNotifier(
            environment: ["NOTIFY_SOCKET": socket.name, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "\(getpid())"],
            shutdownGrace: .seconds(30),
            logger: Logger(label: "test")
        )
        #expect(notifier.watchdogInterval == .milliseconds(50))
        let group = ServiceGroup(configuration: .init(services: [notifier], logger: Logger(label: "test")))
        async let running: Void = group.run()
        notifier.ready(status: "listening on http 127.0.0.1:1")
        // The watchdog pings come from the service; READY=1 arrives among them.
        var messages: [String] = []
        while messages.filter({ $0 == "WATCHDOG=1" }).count < 3 || !messages.contains(where: { $0.hasPrefix("READY=1") }) {
            guard let message = await socket.receive() else { break }
            messages.append(message)
        }
        let ready = try #require(messages.first { $0.hasPrefix("READY=1") })
        #expect(ready == "READY=1\nSTATUS=listening on http 127.0.0.1:1\nMAINPID=\(getpid())")
        await group.triggerGracefulShutdown()
        try await running
        var last: String?
        while let message = await socket.receive() {
            last = message
            if message.hasPrefix("STOPPING=1") { break }
        }
        #expect(last?.hasPrefix("STOPPING=1\n") == true)
        // Stopping may take the grace period and its margins, however short the unit's TimeoutStopSec.
        #expect(last?.hasSuffix("\nEXTEND_TIMEOUT_USEC=45000000") == true)
    }

    @Test func withoutASocketOrForAnotherProcessNothingIsSent() async throws {
        let quiet = SystemdNotifier(environment: [:], logger: Logger(label: "test"))
        #expect(!quiet.isEnabled && quiet.watchdogInterval == nil)
        quiet.ready(status: "ignored")
        // The watchdog belongs to another process (a child of the service's main one, say): no pings from here.
        let other = SystemdNotifier(
            environment: ["NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"],
            logger: Logger(label: "test")
        )
        #expect(other.isEnabled && other.watchdogInterval == nil)
        // A socket nobody listens on: sending fails quietly.
        other.ready(status: "nobody listens")
    }
}
