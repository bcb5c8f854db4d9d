import AsyncHTTPClient
import Foundation
import NIOCore
import Testing

@testable import OAIToCircuit

/// Graceful shutdown: stop accepting, let in-flight streams finish.
@Suite struct ShutdownTests {
    @Test func inFlightStreamFinishesAfterShutdownBegins() async throws {
        try await Harness.with { harness async throws in
            var request = HTTPClientRequest(url: harness.baseURL + "/v1/chat/completions")
            request.method = .POST
            request.headers.add(name: "Authorization", value: "Bearer \(Harness.subkey)")
            request.body = .bytes(ByteBuffer(string: Harness.chatBody(model: "gated-stream", stream: true)))
            let response = try await harness.client.execute(request, timeout: .seconds(30))
            var iterator = response.body.makeAsyncIterator()
            var received = ""
            while !received.contains("Hello"), let chunk = try await iterator.next() { received += String(buffer: chunk) }

            await harness.group.triggerGracefulShutdown()
            // New connections are refused once the listener has closed (bounded: the close is asynchronous).
            var refused = false
            for _ in 0..<100 where !refused {
                let fresh = HTTPClient(eventLoopGroupProvider: .singleton)
                do {
                    _ = try await fresh.execute(HTTPClientRequest(url: harness.baseURL + "/health"), timeout: .seconds(2))
                    try await Task.sleep(for: .milliseconds(20))
                } catch {
                    refused = true
                }
                try await fresh.shutdown()
            }
            #expect(refused)

            await harness.circuit.openGate()
            while let chunk = try await iterator.next() { received += String(buffer: chunk) }
            #expect(received.hasSuffix("data: [DONE]\n\n"))
            #expect(await harness.recorder.usage.count == 1)
        }
    }
}
