import Foundation
import Testing

@testable import OAIToCircuit

/// What Circuit receives: URL, `api-version`, headers and body (section 4.2 steps 4 and 6).
@Suite(.timeLimit(.minutes(1))) struct ForwardingTests {
    @Test func forwardedRequestIsWhatCircuitExpects() async throws {
        let environment = ["API_VERSION": "2024-10-21", "QUOTAS_JSON": #"{"sk-other": {}}"#]
        try await Harness.with(environment: environment) { harness async throws in
            let body =
                #"{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o", "temperature": 0.70, "max_tokens": 1e2, "n": 1, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "seed": 12345678901234567890}"#
            let answer = try await harness.chat(body, headers: [("X-Bridge-Subkey", "sk-other"), ("X-Request-ID", "trace-123")])
            #expect(answer.status == 200)
            let forwarded = try #require(await harness.circuit.requests.entries.first)
            #expect(forwarded.method == "POST")
            #expect(forwarded.path == "/openai/deployments/gpt-4o/chat/completions")
            #expect(forwarded.query == "api-version=2024-10-21")
            #expect(forwarded.headers["content-type"] == "application/json")
            #expect(forwarded.headers["accept"] == "application/json")
            #expect(forwarded.headers["api-key"] == harness.tokens.issuedTokens.first)
            #expect(forwarded.headers["authorization"] == nil)
            #expect(forwarded.headers["x-bridge-subkey"] == nil)
            let text = String(decoding: forwarded.body, as: UTF8.self)
            #expect(!text.contains(Harness.subkey) && !text.contains("sk-other"))
            // Every member but model is forwarded byte for byte (number spellings included), user added at the end.
            #expect(
                text
                    == #"{"messages": [{"role": "user", "content": "hi"}], "temperature": 0.70, "max_tokens": 1e2, "n": 1, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "seed": 12345678901234567890, "user": "{\"appkey\": \"test-appkey\"}"}"#
            )
            #expect(forwarded.json?["model"] == nil)
        }
    }

    @Test func answerCarriesCircuitStatusBodyTypeAndRateLimitHeaders() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(Harness.chatBody(), headers: [("X-Request-ID", "trace-123")])
            #expect(answer.status == 200)
            #expect(answer.headers.first(name: "x-request-id") == "trace-123")
            #expect(answer.headers.first(name: "x-ratelimit-remaining-requests") == "99")
            #expect(answer.headers.first(name: "x-ratelimit-remaining-tokens") == "99000")
            #expect(answer.headers.first(name: "x-ms-region") == nil)
            #expect(answer.headers.first(name: "content-type") == "application/json")
            #expect(answer.body.hasPrefix(#"{"id": "chatcmpl-fake""#))
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.usage == Usage(promptTokens: 11, completionTokens: 7, totalTokens: 18))
            #expect(record.statusCode == 200 && !record.isStreaming && record.requestID == "trace-123")
            #expect(record.clientAddress == "127.0.0.1")
        }
    }

    @Test func generatedRequestIDWhenTheClientSentNoneOrAnUnsafeOne() async throws {
        try await Harness.with { harness async throws in
            let first = try await harness.chat(Harness.chatBody())
            let second = try await harness.chat(Harness.chatBody(), headers: [("X-Request-ID", "bad id with spaces")])
            let ids = [first, second].compactMap { $0.headers.first(name: "x-request-id") }
            #expect(ids.count == 2 && Set(ids).count == 2 && !ids.contains("bad id with spaces"))
            #expect(ids.allSatisfy { UUID(uuidString: $0) != nil })
        }
    }

    @Test func generatedRequestIDsAreVersion4UUIDsAndNeverRepeat() {
        let ids = (0..<200_000).map { _ in RequestID.next() }
        #expect(Set(ids).count == ids.count)
        for id in ids.prefix(1_000) {
            let uuid = try? #require(UUID(uuidString: id))
            #expect(uuid?.uuidString.lowercased() == id)
            let characters = Array(id)
            #expect(characters[14] == "4" && "89ab".contains(characters[19]), "\(id)")
        }
        // Every hexadecimal digit position varies (no fixed prefix a counter would leave).
        let positions = Array(0..<36).filter { ![8, 13, 14, 18, 19, 23].contains($0) }
        for position in positions {
            #expect(Set(ids.prefix(1_000).map { Array($0)[position] }).count > 4, "position \(position)")
        }
    }

    @Test func circuitErrorsArePassedThroughAndCounted() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(
                Harness.chatBody(model: "bad-request"),
                headers: [("X-Forwarded-For", "10.0.0.9")]
            )
            #expect(answer.status == 400)
            #expect(answer.body == #"{"error": {"code": "invalid_request", "message": "Azure rejected this request"}}"#)
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.statusCode == 400 && record.usage == .zero && record.forwardedFor == "10.0.0.9")
            #expect(await harness.recorder.refusals.count == 0)
        }
    }

    // MARK: The appkey rules

    private func forwardedUser(_ extra: String, appKey: String = "test-appkey") async throws -> Any? {
        var result: Any?
        try await Harness.with(environment: ["CIRCUIT_APPKEY": appKey]) { harness async throws in
            _ = try await harness.chat(#"{"model": "gpt-4o", "messages": []\#(extra)}"#)
            result = try #require(await harness.circuit.requests.entries.first).json?["user"] ?? nil
        }
        return result
    }

    @Test func missingUserGetsTheAppkey() async throws {
        #expect(try await forwardedUser("") as? String == #"{"appkey": "test-appkey"}"#)
        #expect(try await forwardedUser(#", "user": """#) as? String == #"{"appkey": "test-appkey"}"#)
        #expect(try await forwardedUser(#", "user": null"#) as? String == #"{"appkey": "test-appkey"}"#)
    }

    @Test func jsonUserWithoutAppkeyGetsItAdded() async throws {
        let user = try await forwardedUser(#", "user": "{\"session_id\": \"s-1\", \"user\": \"alice\"}""#) as? String
        #expect(user == #"{"session_id": "s-1", "user": "alice", "appkey": "test-appkey"}"#)
    }

    @Test func jsonUserWithAnotherAppkeyGetsItReplacedInPlace() async throws {
        let user = try await forwardedUser(#", "user": "{\"appkey\": \"old\", \"session_id\": \"s-1\"}""#) as? String
        #expect(user == #"{"appkey": "test-appkey", "session_id": "s-1"}"#)
    }

    @Test func userAlreadyHoldingTheAppkeyIsUntouched() async throws {
        let original = #"{\"appkey\":\"test-appkey\",\"user\":\"bob\"}"#
        let user = try await forwardedUser(#", "user": "\#(original)""#) as? String
        #expect(user == #"{"appkey":"test-appkey","user":"bob"}"#)
    }

    @Test func userThatIsNotJSONIsForwardedUnchanged() async throws {
        // Circuit refuses it (no appkey), and the client sees Circuit's answer: the bridge does not guess.
        var forwarded: String?
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(#"{"model": "gpt-4o", "messages": [], "user": "alice"}"#)
            #expect(answer.status == 401)
            forwarded = try #require(await harness.circuit.requests.entries.first).json?["user"] as? String
        }
        #expect(forwarded == "alice")
    }
}
