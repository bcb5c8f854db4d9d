import Foundation
import Logging
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The `sd_notify` protocol without libsystemd: datagrams of `KEY=VALUE` lines to the Unix socket named by
/// `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). `READY=1` once the listeners accept,
/// `STOPPING=1` when graceful shutdown begins, and `WATCHDOG=1` every half of `WATCHDOG_USEC` when the unit sets
/// `WatchdogSec` (for this process: `WATCHDOG_PID`, when set, must be ours). Without `NOTIFY_SOCKET` it does nothing.
///
/// A ping is sent from a task on the same executor as the requests, so a bridge that stops scheduling work stops
/// pinging and systemd restarts it.
public final class SystemdNotifier: Service, Sendable {
    let socketPath: String?
    /// Half the watchdog interval; `nil` without a watchdog.
    let watchdogInterval: Duration?
    /// How long stopping may take (the grace period, Splunk's drain within it, and a margin): sent with STOPPING=1
    /// as EXTEND_TIMEOUT_USEC, so a grace period set above the unit's TimeoutStopSec is not cut short.
    let stopAllowance: Duration?
    let logger: Logger

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from `environment`. `shutdownGrace`:
    /// SHUTDOWN_GRACE_SECONDS.
    public init(
        environment: [String: String] = ProcessInfo.processInfo.environment,
        shutdownGrace: Duration? = nil,
        logger: Logger
    ) {
        let path = environment["NOTIFY_SOCKET"].flatMap { $0.isEmpty ? nil : $0 }
        self.socketPath = path
        self.logger = logger
        // The service group's grace, then its 5 s of cancellation, and a margin to exit.
        self.stopAllowance = shutdownGrace.map { $0 + .seconds(15) }
        let forUs = environment["WATCHDOG_PID"].map { Int32($0) == getpid() } ?? true
        if path != nil, forUs, let text = environment["WATCHDOG_USEC"], let microseconds = UInt64(text), microseconds > 0 {
            self.watchdogInterval = .microseconds(Int64(clamping: microseconds / 2))
        } else {
            self.watchdogInterval = nil
        }
    }

    public var isEnabled: Bool { socketPath != nil }

    /// Tells systemd the service is up (its listeners accept connections).
    public func ready(status: String) {
        send("READY=1\nSTATUS=\(status)\nMAINPID=\(getpid())")
    }

    /// Pings the watchdog until graceful shutdown, then says the service is stopping.
    public func run() async throws {
        guard isEnabled else {
            try? await gracefulShutdown()
            return
        }
        if let watchdogInterval {
            await cancelWhenGracefulShutdown {
                while !Task.isCancelled {
                    self.send("WATCHDOG=1")
                    try? await Task.sleep(for: watchdogInterval)
                }
            }
        } else {
            try? await gracefulShutdown()
        }
        var stopping = "STOPPING=1\nSTATUS=stopping: finishing in-flight requests"
        if let stopAllowance {
            let (seconds, attoseconds) = stopAllowance.components
            stopping += "\nEXTEND_TIMEOUT_USEC=\(seconds * 1_000_000 + attoseconds / 1_000_000_000_000)"
        }
        send(stopping)
    }

    /// One datagram; a failure is logged at debug level and never stops the bridge.
    func send(_ message: String) {
        guard let socketPath else { return }
        let descriptor = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { return }
        defer { close(descriptor) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var path = Array(socketPath.utf8)
        // `@name`: Linux's abstract namespace, where the name starts with a zero byte.
        if path.first == UInt8(ascii: "@") { path[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard path.count < capacity else {
            logger.warning("NOTIFY_SOCKET is too long to use", metadata: ["length": "\(path.count)"])
            return
        }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            buffer.copyBytes(from: path)
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + path.count)
        let bytes = Array(message.utf8)
        let sent = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { socketAddress in
                sendto(descriptor, bytes, bytes.count, Int32(MSG_NOSIGNAL), socketAddress, length)
            }
        }
        if sent < 0 {
            logger.debug("could not notify systemd", metadata: ["errno": "\(errno)"])
        }
    }
}
