import AsyncHTTPClient
import CircuitFakes
import Foundation
import Hummingbird
import NIOCore
import Testing

@testable import OAIToCircuit

/// Section 4.1's error rows that the bridge core owns, each against the live server.
@Suite(.timeLimit(.minutes(1))) struct ChatErrorTests {
    @Test func missingSubkeyIs401() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(Harness.chatBody(), subkey: nil)
            expectError(
                answer,
                status: 401,
                code: "subkey_required",
                message: "Subkey required. Provide 'Authorization: Bearer <subkey>' or 'X-Bridge-Subkey' header."
            )
            #expect(answer.error?["type"] as? String == "authentication_error")
            #expect(await harness.circuit.requests.count == 0)
            await harness.recorder.refusals.wait { $0.count == 1 }
            #expect(await harness.recorder.refusals.entries.first?.error.code == "subkey_required")
        }
    }

    @Test func blankSubkeyHeadersCountAsMissing() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(
                Harness.chatBody(),
                subkey: nil,
                headers: [("X-Bridge-Subkey", "   "), ("Authorization", "Bearer ")]
            )
            expectError(answer, status: 401, code: "subkey_required")
            let basic = try await harness.chat(Harness.chatBody(), subkey: nil, headers: [("Authorization", "Basic abc")])
            expectError(basic, status: 401, code: "subkey_required")
        }
    }

    @Test func subkeyFromEitherHeaderIsAccepted() async throws {
        try await Harness.with(environment: ["QUOTAS_JSON": #"{"sk-x": {}, "sk-y": {}}"#]) { harness async throws in
            #expect(
                try await harness.chat(Harness.chatBody(), subkey: nil, headers: [("X-Bridge-Subkey", " sk-x ")]).status == 200
            )
            #expect(
                try await harness.chat(Harness.chatBody(), subkey: nil, headers: [("Authorization", "bEaReR sk-y")]).status == 200
            )
            let records = await harness.recorder.usage.entries
            #expect(records.map(\.caller.keyID) == [Caller.hash("sk-x"), Caller.hash("sk-y")])
        }
    }

    @Test func anonymousWhenSubkeyNotRequired() async throws {
        try await Harness.with(environment: ["REQUIRE_SUBKEY": "false"]) { harness async throws in
            let answer = try await harness.chat(Harness.chatBody(), subkey: nil)
            #expect(answer.status == 200)
            #expect(await harness.recorder.usage.entries.first?.caller.keyID == "anonymous")
        }
    }

    @Test func bodiesThatAreNotJSONObjects() async throws {
        try await Harness.with { harness async throws in
            for body in [
                "[1, 2]", "not json", "", "{\"model\": \"gpt-4o\"", "\"text\"", "{\"model\": \"gpt-4o\"} x", "{\"a\": 01}",
            ] {
                let answer = try await harness.chat(body)
                expectError(answer, status: 400, code: "invalid_json", message: "Invalid JSON in request body")
            }
            let deep = String(repeating: "[", count: 100_000)
            expectError(try await harness.chat(#"{"model": "gpt-4o", "x": \#(deep)}"#), status: 400, code: "invalid_json")
            #expect(await harness.circuit.requests.count == 0)
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
        }
    }

    @Test func modelMissingEmptyOrNotAString() async throws {
        try await Harness.with { harness async throws in
            for body in [
                #"{"messages": []}"#, #"{"model": ""}"#, #"{"model": 4}"#, #"{"model": null}"#, #"{"model": ["gpt-4o"]}"#,
            ] {
                let answer = try await harness.chat(body)
                expectError(answer, status: 400, code: "model_required", message: "Model parameter required")
                #expect(answer.error?["param"] as? String == "model")
            }
            #expect(await harness.circuit.requests.count == 0)
        }
    }

    @Test(arguments: [
        "../x", "a/b", "a?b", "a#b", "%2e%2e", String(repeating: "m", count: 129), "-dash", "a..b", "a b", "é", ".hidden",
    ])
    func hostileModelNamesNeverReachCircuit(_ model: String) async throws {
        try await Harness.with { harness async throws in
            var body: [UInt8] = Array(#"{"model": "#.utf8)
            JSONString.encode(model, into: &body)
            body.append(contentsOf: #", "messages": []}"#.utf8)
            let answer = try await harness.chat(String(decoding: body, as: UTF8.self))
            expectError(answer, status: 400, code: "invalid_model", message: ModelName.rule)
            #expect(await harness.circuit.requests.count == 0)
        }
    }

    @Test func longestValidModelNameIsForwarded() async throws {
        try await Harness.with { harness async throws in
            let model = String(repeating: "m", count: 128)
            #expect(try await harness.chat(Harness.chatBody(model: model)).status == 200)
            #expect(await harness.circuit.requests.entries.first?.path == "/openai/deployments/\(model)/chat/completions")
        }
    }

    @Test func oversizedBodyIs413AndTheServerKeepsServing() async throws {
        try await Harness.with { harness async throws in
            let huge = #"{"model": "gpt-4o", "pad": ""# + String(repeating: "x", count: 17 << 20) + #""}"#
            let answer = try await harness.chat(huge)
            expectError(
                answer,
                status: 413,
                code: "request_too_large",
                message: "Request body too large: the limit is 16777216 bytes"
            )
            #expect(await harness.circuit.requests.count == 0)
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
        }
    }

    @Test func configuredLimitAppliesWithoutContentLength() async throws {
        try await Harness.with(environment: ["MAX_REQUEST_BYTES": "1000"]) { harness async throws in
            // A streamed (chunked) upload has no Content-Length: the limit is enforced while reading.
            var request = HTTPClientRequest(url: harness.baseURL + "/v1/chat/completions")
            request.method = .POST
            request.headers.add(name: "Authorization", value: "Bearer \(Harness.subkey)")
            let chunks = [
                ByteBuffer(string: #"{"model": "gpt-4o", "pad": ""#), ByteBuffer(repeating: UInt8(ascii: "x"), count: 2000),
            ]
            let (stream, source) = AsyncStream<ByteBuffer>.makeStream()
            for chunk in chunks { source.yield(chunk) }
            source.finish()
            request.body = .stream(stream, length: .unknown)
            let response = try await harness.client.execute(request, timeout: .seconds(10))
            #expect(response.status.code == 413)
            _ = try await response.body.collect(upTo: 1 << 20)
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
        }
    }

    @Test func upstreamTimeoutIs504AndReleasesTheReservation() async throws {
        var settings = FakeCircuit.Settings()
        settings.headerDelay = .seconds(3)
        try await Harness.with(environment: ["UPSTREAM_TIMEOUT_SECONDS": "1"], circuitSettings: settings) {
            harness async throws in
            let answer = try await harness.chat(Harness.chatBody(model: "slow-headers"))
            expectError(
                answer,
                status: 504,
                code: "upstream_timeout",
                message: "Gateway timeout - Circuit API took too long to respond"
            )
            #expect(answer.error?["type"] as? String == "api_error")
            #expect(await harness.recorder.usage.count == 0)
        }
    }

    @Test func connectionRefusedIs502() async throws {
        let refusing = try RefusingPort()
        try await Harness.with(environment: ["CIRCUIT_BASE": "http://127.0.0.1:\(refusing.port)"]) { harness async throws in
            let answer = try await harness.chat(Harness.chatBody())
            expectError(answer, status: 502, code: "upstream_unreachable", message: "Gateway error: could not reach Circuit API")
            #expect(!answer.body.contains("127.0.0.1"))
            await harness.recorder.refusals.wait { $0.count == 1 }
            #expect(await harness.recorder.refusals.entries[0].model == "gpt-4o")
        }
    }

    @Test func failingTokenEndpointIs502() async throws {
        var tokens = FakeTokenEndpoint.Settings()
        tokens.failWithStatus = 500
        try await Harness.with(tokenSettings: tokens) { harness async throws in
            let answer = try await harness.chat(Harness.chatBody())
            expectError(answer, status: 502, code: "upstream_auth_failed", message: "Failed to authenticate with Circuit API")
            #expect(await harness.circuit.requests.count == 0)
        }
    }

    @Test func wrongClientSecretIs502() async throws {
        try await Harness.with(environment: ["CIRCUIT_CLIENT_SECRET": "wrong-secret"]) { harness async throws in
            expectError(try await harness.chat(Harness.chatBody()), status: 502, code: "upstream_auth_failed")
            #expect(await harness.tokens.requests.count == 1)
            #expect(!harness.logs.all.joined().contains("wrong-secret"))
        }
    }

    @Test func missingCredentialsIs502WithoutCallingTheTokenEndpoint() async throws {
        try await Harness.with(environment: ["CIRCUIT_CLIENT_ID": "", "CIRCUIT_CLIENT_SECRET": ""]) { harness async throws in
            expectError(try await harness.chat(Harness.chatBody()), status: 502, code: "upstream_auth_failed")
            #expect(await harness.tokens.requests.count == 0)
            let health = try await harness.request(.GET, "/health")
            #expect(health.json?["credentials_configured"] as? Bool == false)
        }
    }

    @Test func unknownPathIs404AndWrongMethodIs405() async throws {
        try await Harness.with { harness async throws in
            expectError(try await harness.request(.GET, "/v1/completions"), status: 404, code: "not_found")
            expectError(try await harness.request(.GET, "/docs"), status: 404, code: "not_found")
            expectError(try await harness.request(.GET, "/openapi.json"), status: 404, code: "not_found")
            expectError(try await harness.request(.GET, "/v1/chat/completions"), status: 405, code: "method_not_allowed")
            expectError(try await harness.request(.DELETE, "/v1/models"), status: 405, code: "method_not_allowed")
            expectError(try await harness.request(.POST, "/health", body: "{}"), status: 405, code: "method_not_allowed")
        }
    }
}
