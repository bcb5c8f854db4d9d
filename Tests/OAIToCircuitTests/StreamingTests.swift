import AsyncHTTPClient
import CircuitFakes
import Foundation
import NIOCore
import Testing

@testable import OAIToCircuit

/// Streaming pass-through (section 4.2, Streaming).
@Suite(.timeLimit(.minutes(1))) struct StreamingTests {
    /// The `data:` payloads of an SSE body, in order.
    static func payloads(_ body: String) -> [String] {
        body.replacingOccurrences(of: "\r\n", with: "\n").split(separator: "\n").compactMap { line in
            guard line.hasPrefix("data:") else { return nil }
            return line.dropFirst(5).trimmingCharacters(in: .whitespaces)
        }
    }

    @Test func firstChunkArrivesBeforeCircuitSendsItsLast() async throws {
        try await Harness.with { harness async throws in
            let request = harness.chatRequest(Harness.chatBody(model: "gated-stream", stream: true))
            let response = try await harness.client.execute(request, timeout: .seconds(30))
            #expect(response.headers.first(name: "content-type")?.hasPrefix("text/event-stream") == true)
            var received = ""
            var iterator = response.body.makeAsyncIterator()
            // Circuit holds the rest until the gate opens: this only returns if the bridge does not buffer.
            while !received.contains("Hello"), let chunk = try await iterator.next() {
                received += String(buffer: chunk)
            }
            #expect(received.contains("prompt_filter_results"))
            await harness.circuit.openGate()
            while let chunk = try await iterator.next() { received += String(buffer: chunk) }
            #expect(received.hasSuffix("data: [DONE]\n\n"))
        }
    }

    @Test func usageChunkIsHiddenUnlessTheClientAskedButUsageIsStillRecorded() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(Harness.chatBody(stream: true))
            #expect(answer.status == 200)
            #expect(answer.headers.first(name: "cache-control") == "no-cache")
            #expect(answer.headers.first(name: "x-accel-buffering") == "no")
            let payloads = Self.payloads(answer.body)
            #expect(payloads.last == "[DONE]")
            let chunks = payloads.dropLast().compactMap(Harness.json)
            #expect(chunks.count == payloads.count - 1)
            #expect(!chunks.contains { $0["usage"] is [String: Any] })
            // Azure's prompt_filter_results chunk also has empty choices, and must pass.
            #expect(chunks.first?["prompt_filter_results"] != nil)
            let content = chunks.compactMap {
                (($0["choices"] as? [[String: Any]])?.first?["delta"] as? [String: Any])?["content"] as? String
            }
            #expect(content.joined() == "Hello from fake Circuit")
            // The bridge asked Circuit for usage…
            let forwarded = try #require(await harness.circuit.requests.entries.first?.json)
            #expect((forwarded["stream_options"] as? [String: Any])?["include_usage"] as? Bool == true)
            // …and recorded it.
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.usage == Usage(promptTokens: 11, completionTokens: 4, totalTokens: 15))
            #expect(record.isStreaming && !record.clientDisconnected)
        }
    }

    @Test func usageChunkIsShownWhenTheClientAskedForIt() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(
                Harness.chatBody(stream: true, extra: #", "stream_options": {"include_usage": true}"#)
            )
            let chunks = Self.payloads(answer.body).compactMap(Harness.json)
            let usage = try #require(chunks.last?["usage"] as? [String: Any])
            #expect(usage["total_tokens"] as? Int == 15)
            #expect((chunks.last?["choices"] as? [Any])?.isEmpty == true)
            #expect(await harness.recorder.usage.entries.first?.usage.totalTokens == 15)
        }
    }

    @Test func otherStreamOptionsAreKeptWhenUsageIsAdded() async throws {
        try await Harness.with { harness async throws in
            _ = try await harness.chat(
                Harness.chatBody(stream: true, extra: #", "stream_options": {"include_usage": false, "x_extra": 1}"#)
            )
            let body = String(decoding: try #require(await harness.circuit.requests.entries.first).body, as: UTF8.self)
            #expect(body.contains(#""stream_options": {"x_extra": 1, "include_usage": true}"#))
        }
    }

    @Test func crlfAndDataWithoutSpaceAreUnderstood() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(Harness.chatBody(model: "crlf-stream", stream: true))
            #expect(answer.body.contains("\r\n\r\n"))
            #expect(!answer.body.contains(#""usage""#))
            #expect(answer.body.hasSuffix("data:[DONE]\r\n\r\n"))
            #expect(await harness.recorder.usage.entries.first?.usage == Usage(promptTokens: 11, completionTokens: 4))
        }
    }

    // The timeouts in these two tests are seconds, not fractions of one: a whole test run shares two cores, and a
    // one-second deadline for Circuit's head (connecting included) was once missed there.
    @Test func slowStreamLongerThanTheTimeoutButWithShortGapsCompletes() async throws {
        var settings = FakeCircuit.Settings()
        settings.chunkGap = .milliseconds(750)
        settings.chunkCount = 6
        try await Harness.with(environment: ["UPSTREAM_TIMEOUT_SECONDS": "3"], circuitSettings: settings) {
            harness async throws in
            let started = ContinuousClock.now
            let answer = try await harness.chat(Harness.chatBody(model: "slow-stream", stream: true))
            #expect(ContinuousClock.now - started > .seconds(3))
            #expect(answer.status == 200)
            #expect(answer.body.hasSuffix("data: [DONE]\n\n"))
            #expect(Self.payloads(answer.body).filter { $0.contains(" w5") }.count == 1)
            #expect(await harness.recorder.usage.entries.first?.usage.completionTokens == 6)
        }
    }

    @Test func streamThatStallsMidwayEndsWithAnErrorEvent() async throws {
        var settings = FakeCircuit.Settings()
        settings.headerDelay = .seconds(6)
        try await Harness.with(environment: ["UPSTREAM_TIMEOUT_SECONDS": "3"], circuitSettings: settings) {
            harness async throws in
            let answer = try await harness.chat(Harness.chatBody(model: "stall-stream", stream: true))
            #expect(answer.status == 200)
            let last = try #require(Self.payloads(answer.body).last.flatMap(Harness.json))
            #expect((last["error"] as? [String: Any])?["code"] as? String == "upstream_timeout")
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.statusCode == 200 && record.isStreaming && !record.clientDisconnected)
        }
    }

    @Test func clientLeavingWhileCircuitIsSilentIsNoticedWithoutWaitingForCircuit() async throws {
        try await Harness.with { harness async throws in
            do {
                let response = try await harness.client.execute(
                    harness.chatRequest(Harness.chatBody(model: "gated-stream", stream: true)),
                    timeout: .seconds(30)
                )
                var received = ""
                for try await chunk in response.body {
                    received += String(buffer: chunk)
                    if received.contains("Hello") { break }
                }
            }
            // Circuit stays silent behind its gate: only the bridge noticing the closed connection ends this wait.
            await harness.recorder.usage.wait { !$0.isEmpty }
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.clientDisconnected && record.isStreaming)
            await harness.circuit.openGate()
        }
    }

    @Test func clientDisconnectCancelsCircuitAndRecordsUsageSoFar() async throws {
        var settings = FakeCircuit.Settings()
        settings.chunkGap = .milliseconds(20)
        try await Harness.with(circuitSettings: settings) { harness async throws in
            let request = harness.chatRequest(
                Harness.chatBody(
                    model: "endless-stream",
                    stream: true,
                    extra: #", "stream_options": {"include_usage": true}"#
                )
            )
            let response = try await harness.client.execute(request, timeout: .seconds(30))
            var seen = 0
            for try await chunk in response.body {
                seen += String(buffer: chunk).components(separatedBy: " w").count - 1
                if seen >= 3 { break }
            }
            // Leaving the loop drops the response, which closes the connection to the bridge.
            await harness.circuit.streams.wait { !$0.isEmpty }
            #expect(
                await harness.circuit.streams.entries == [FakeCircuit.StreamOutcome(model: "endless-stream", completed: false)]
            )
            await harness.recorder.usage.wait { !$0.isEmpty }
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.clientDisconnected && record.isStreaming && record.statusCode == 200)
            // The bridge keeps serving.
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
        }
    }
}
