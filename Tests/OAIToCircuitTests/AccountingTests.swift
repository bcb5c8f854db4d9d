import AsyncHTTPClient
import CircuitFakes
import Foundation
import Hummingbird
import NIOConcurrencyHelpers
import NIOCore
import Testing

@testable import OAIToCircuit

/// The seams later components fill: reservations given back when Circuit was never reached, and usage recorded for
/// every answer Circuit gave, also when the client is gone before it could get it.
@Suite(.timeLimit(.minutes(1))) struct AccountingTests {
    /// Admits everything, and remembers what it admitted and released.
    final class RecordingPolicy: AdmissionPolicy {
        let admitted = NIOLockedValueBox<[String]>([])
        let released = NIOLockedValueBox<[String]>([])

        func admit(_ caller: Caller, model: String) async throws(BridgeError) -> Admission {
            admitted.withLockedValue { $0.append(model) }
            return Admission(caller: caller, model: model)
        }
        func release(_ admission: Admission) async { released.withLockedValue { $0.append(admission.model) } }
        func allows(_ caller: Caller, model: String) async -> Bool { model != "o3" }
    }

    @Test func reservationsAreGivenBackOnlyWhenCircuitWasNeverReached() async throws {
        let policy = RecordingPolicy()
        var tokens = FakeTokenEndpoint.Settings()
        tokens.failWithStatus = 500
        var settings = FakeCircuit.Settings()
        settings.headerDelay = .seconds(6)
        let usePolicy: (inout Bridge) -> Void = { $0.policy = policy }
        // Seconds, not one: the requests Circuit answers at once must get their head within it on a loaded machine.
        try await Harness.with(
            environment: ["UPSTREAM_TIMEOUT_SECONDS": "3"],
            circuitSettings: settings,
            tokenSettings: tokens,
            configure: usePolicy
        ) {
            harness async throws in
            _ = try await harness.chat(Harness.chatBody(model: "gpt-4o"))  // no token: 502
            #expect(policy.released.withLockedValue { $0 } == ["gpt-4o"])
            harness.tokens.settings.withLockedValue { $0.failWithStatus = nil }
            harness.clock.advance(by: TokenProvider.failureBackoff)
            _ = try await harness.chat(Harness.chatBody(model: "slow-headers"))  // 504
            _ = try await harness.chat(Harness.chatBody(model: "bad-request"))  // Circuit answered 400: counts
            _ = try await harness.chat(Harness.chatBody(model: "gpt-4o"))  // 200: counts
            #expect(policy.admitted.withLockedValue { $0 } == ["gpt-4o", "slow-headers", "bad-request", "gpt-4o"])
            #expect(policy.released.withLockedValue { $0 } == ["gpt-4o", "slow-headers"])
            #expect(await harness.recorder.usage.entries.map(\.statusCode) == [400, 200])
            let refusals = await harness.recorder.refusals.entries
            #expect(refusals.map(\.error.code) == ["upstream_auth_failed", "upstream_timeout"])
            #expect(refusals.allSatisfy { $0.caller?.keyID == Caller.hash(Harness.subkey) })
        }
    }

    @Test func modelsTheCallerMayNotUseAreNotListed() async throws {
        let policy: (inout Bridge) -> Void = { $0.policy = RecordingPolicy() }
        try await Harness.with(configure: policy) { harness async throws in
            let data = try #require(try await harness.request(.GET, "/v1/models").json?["data"] as? [[String: Any]])
            #expect(!data.contains { $0["id"] as? String == "o3" } && data.count == 6)
            expectError(try await harness.request(.GET, "/v1/models/o3"), status: 404, code: "model_not_found")
        }
    }

    @Test func aStreamWhoseClientLeftBeforeTheAnswerIsStillAccounted() async throws {
        var settings = FakeCircuit.Settings()
        settings.headerDelay = .milliseconds(600)
        try await Harness.with(circuitSettings: settings) { harness async throws in
            let request = harness.chatRequest(Harness.chatBody(model: "slow-headers", stream: true))
            // The client gives up once Circuit has the request, long before Circuit answers (waiting for that, not a
            // fixed time: a loaded machine may take longer than any timeout to get the request there).
            let client = Task { try await harness.client.execute(request, timeout: .seconds(30)) }
            await harness.circuit.requests.wait { $0.contains { $0.path.contains("slow-headers") } }
            client.cancel()
            await #expect(throws: (any Error).self) { _ = try await client.value }
            await harness.recorder.usage.wait { !$0.isEmpty }
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.clientDisconnected && record.isStreaming && record.statusCode == 200)
        }
    }

    @Test func aStreamBodyThatNeverRunsIsAccountedWhenDropped() async throws {
        try await Harness.with { harness async throws in
            let caller = Caller(subkey: Harness.subkey)
            let request = Request(
                head: .init(method: .post, scheme: "http", authority: "bridge", path: "/v1/chat/completions"),
                body: .init(buffer: ByteBuffer())
            )
            var exchange = Exchange(request: request, clientAddress: "192.0.2.7")
            exchange.model = "gpt-4o"
            let accounting = Accounting(
                bridge: harness.bridge,
                exchange: exchange,
                admission: Admission(caller: caller, model: "gpt-4o"),
                isStreaming: true,
                status: .ok
            )
            // A stream Circuit has begun and holds open (the gate stays shut).
            let chat = try ChatRequest.parse(
                ByteBuffer(string: Harness.chatBody(model: "gated-stream", stream: true)),
                appKey: harness.bridge.configuration.appKey
            )
            let answer = try await harness.bridge.circuit.send(
                model: chat.model,
                body: chat.upstreamBody,
                collectLimit: 1 << 20,
                logger: harness.bridge.logger
            )
            guard case .stream(let upstream) = answer.body else {
                Issue.record("Circuit's answer is not a stream")
                return
            }
            // A response dropped before its body ran: the body, and so this guard, goes unrun.
            _ = UnstartedStream(accounting: accounting, upstream: upstream, finish: {})
            await harness.recorder.usage.wait { !$0.isEmpty }
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.clientDisconnected && record.isStreaming && record.clientAddress == "192.0.2.7")
            // Nobody reads the rest of Circuit's answer, so its connection is given up rather than left paused.
            await #expect(throws: UpstreamError.cancelled) {
                for try await _ in upstream {}
            }
            await harness.circuit.openGate()  // the fake's handler still waits there
        }
    }

    @Test func requestIDIsOnEveryAnswerAndInEveryRecord() async throws {
        try await Harness.with { harness async throws in
            let refused = try await harness.chat(Harness.chatBody(), subkey: nil, headers: [("X-Request-ID", "req-401")])
            #expect(refused.headers.first(name: "x-request-id") == "req-401")
            let invalid = try await harness.chat("[]", headers: [("X-Request-ID", "req-400")])
            #expect(invalid.headers.first(name: "x-request-id") == "req-400")
            let streamed = try await harness.chat(Harness.chatBody(stream: true), headers: [("X-Request-ID", "req-sse")])
            #expect(streamed.headers.first(name: "x-request-id") == "req-sse")
            let missing = try await harness.request(.GET, "/nowhere", headers: [("X-Request-ID", "req-404")])
            #expect(missing.headers.first(name: "x-request-id") == "req-404")
            #expect(await harness.recorder.usage.entries.map(\.requestID) == ["req-sse"])
            #expect(await harness.recorder.refusals.entries.map(\.requestID) == ["req-401"])
        }
    }

    @Test func subkeyIsCheckedBeforeTheBody() async throws {
        try await Harness.with(environment: ["MAX_REQUEST_BYTES": "100"]) { harness async throws in
            expectError(try await harness.chat("not json", subkey: nil), status: 401, code: "subkey_required")
            let big = String(repeating: "x", count: 500)
            expectError(try await harness.chat(big, subkey: nil), status: 401, code: "subkey_required")
            expectError(try await harness.chat(big), status: 413, code: "request_too_large")
        }
    }

    @Test func nonJSONAnswersFromCircuitPassThrough() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(Harness.chatBody(model: "text-error"))
            #expect(answer.status == 503 && answer.body == "upstream overloaded")
            #expect(answer.headers.first(name: "content-type") == "text/plain")
            #expect(answer.headers.first(name: "x-ratelimit-reset-requests") == "7s")
            #expect(await harness.recorder.usage.entries.first?.usage == .zero)
        }
    }

    @Test func aStreamBrokenMidLineEndsWithAParsableErrorEvent() async throws {
        var settings = FakeCircuit.Settings()
        settings.headerDelay = .seconds(6)
        try await Harness.with(environment: ["UPSTREAM_TIMEOUT_SECONDS": "3"], circuitSettings: settings) {
            harness async throws in
            let answer = try await harness.chat(Harness.chatBody(model: "broken-stream", stream: true))
            let events = answer.body.components(separatedBy: "\n\n").filter { !$0.isEmpty }
            // Every event stands alone and parses: the half line Circuit left is gone.
            #expect(events.allSatisfy { $0.hasPrefix("data: ") && Harness.json(String($0.dropFirst(6))) != nil })
            let last = try #require(events.last)
            #expect(last.hasPrefix("data: "))
            let json = try #require(Harness.json(String(last.dropFirst(6))))
            #expect((json["error"] as? [String: Any])?["code"] as? String == "upstream_timeout")
        }
    }
}
