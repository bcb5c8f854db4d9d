import AsyncHTTPClient
import Foundation
import NIOCore
import NIOSSL
import Testing

@testable import OAIToCircuit

/// Graceful shutdown: stop accepting on every listener at once, let in-flight streams finish.
@Suite(.timeLimit(.minutes(1))) struct ShutdownTests {
    /// Whether a new connection to `url` is refused. The listener closes asynchronously after shutdown begins and
    /// nothing outside the server can await that, so this retries a bounded number of times.
    static func refusesNewConnections(_ url: String) async throws -> Bool {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateVerification = .none
        var configuration = HTTPClient.Configuration(tlsConfiguration: tls)
        configuration.connectionPool.retryConnectionEstablishment = false  // a refusal must fail at once
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        defer { _ = client.shutdown() }
        for _ in 0..<100 {
            do {
                _ = try await client.execute(HTTPClientRequest(url: url + "/health"), timeout: .seconds(2))
            } catch {
                return true
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        return false
    }

    @Test(arguments: [BridgeConfiguration.TLSMode.off, .both])
    func inFlightStreamFinishesAfterShutdownBegins(_ mode: BridgeConfiguration.TLSMode) async throws {
        let files = try HTTPSTests.certificate()
        defer { try? FileManager.default.removeItem(at: files.directory) }
        try await Harness.with(listener: HTTPSTests.listener(mode, cert: files.cert, key: files.key), trusting: files.cert) {
            harness async throws in
            // With both listeners the stream runs over HTTPS, and the HTTP listener must stop accepting all the same.
            let request = harness.chatRequest(Harness.chatBody(model: "gated-stream", stream: true), https: mode == .both)
            let response = try await harness.client.execute(request, timeout: .seconds(30))
            var iterator = response.body.makeAsyncIterator()
            var received = ""
            while !received.contains("Hello"), let chunk = try await iterator.next() { received += String(buffer: chunk) }

            await harness.group.triggerGracefulShutdown()
            #expect(try await Self.refusesNewConnections(harness.baseURL))
            if mode == .both { #expect(try await Self.refusesNewConnections(harness.httpsURL)) }
            await harness.circuit.openGate()
            while let chunk = try await iterator.next() { received += String(buffer: chunk) }
            #expect(received.hasSuffix("data: [DONE]\n\n"))
            #expect(await harness.recorder.usage.count == 1)
        }
    }
}
