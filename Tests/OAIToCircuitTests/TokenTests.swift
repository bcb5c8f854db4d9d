import CircuitFakes
import Testing

@testable import OAIToCircuit

/// The OAuth2 token cache (section 4.2 step 5).
@Suite struct TokenTests {
    @Test func oneTokenServesManyChats() async throws {
        try await Harness.with { harness async throws in
            for _ in 0..<5 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
            #expect(await harness.tokens.requests.count == 1)
            #expect(Set(await harness.circuit.requests.entries.compactMap { $0.headers["api-key"] }).count == 1)
        }
    }

    @Test func concurrentFirstRequestsShareOneRefresh() async throws {
        var slow = FakeTokenEndpoint.Settings()
        slow.delay = .milliseconds(300)
        try await Harness.with(tokenSettings: slow) { harness async throws in
            let statuses = try await withThrowingTaskGroup(of: Int.self) { group in
                for _ in 0..<50 { group.addTask { try await harness.chat(Harness.chatBody()).status } }
                return try await group.reduce(into: [Int]()) { $0.append($1) }
            }
            #expect(statuses == Array(repeating: 200, count: 50))
            #expect(await harness.tokens.requests.count == 1)
        }
    }

    @Test func tokenIsRefreshedSixtySecondsBeforeItExpires() async throws {
        try await Harness.with { harness async throws in
            _ = try await harness.chat(Harness.chatBody())
            harness.clock.advance(by: 3600 - 61)
            _ = try await harness.chat(Harness.chatBody())
            #expect(await harness.tokens.requests.count == 1)
            harness.clock.advance(by: 2)
            _ = try await harness.chat(Harness.chatBody())
            #expect(await harness.tokens.requests.count == 2)
            let keys = await harness.circuit.requests.entries.compactMap { $0.headers["api-key"] }
            #expect(keys == ["access-token-1", "access-token-1", "access-token-2"])
        }
    }

    @Test func upstream401RefreshesOnceAndRetries() async throws {
        try await Harness.with { harness async throws in
            _ = try await harness.chat(Harness.chatBody())
            harness.tokens.revoke("access-token-1")
            let answer = try await harness.chat(Harness.chatBody())
            #expect(answer.status == 200)
            #expect(await harness.tokens.requests.count == 2)
            let keys = await harness.circuit.requests.entries.compactMap { $0.headers["api-key"] }
            #expect(keys == ["access-token-1", "access-token-1", "access-token-2"])
            #expect(await harness.recorder.usage.count == 2)
        }
    }

    @Test func secondUpstream401IsPassedToTheClient() async throws {
        var refusing = FakeCircuit.Settings()
        refusing.refuseEveryToken = true
        try await Harness.with(circuitSettings: refusing) { harness async throws in
            let answer = try await harness.chat(Harness.chatBody())
            #expect(answer.status == 401)
            #expect(answer.error?["message"] as? String == "Access denied due to invalid subscription key or wrong API endpoint.")
            #expect(await harness.tokens.requests.count == 2)
            #expect(await harness.circuit.requests.count == 2)
            // Circuit answered, so the request is accounted with Circuit's status.
            #expect(await harness.recorder.usage.entries.map(\.statusCode) == [401])
        }
    }

    @Test func failedRefreshIsRetriedByTheNextRequest() async throws {
        var failing = FakeTokenEndpoint.Settings()
        failing.failWithStatus = 503
        try await Harness.with(tokenSettings: failing) { harness async throws in
            expectError(try await harness.chat(Harness.chatBody()), status: 502, code: "upstream_auth_failed")
            harness.tokens.settings.withLockedValue { $0.failWithStatus = nil }
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
            #expect(await harness.tokens.requests.count == 2)
        }
    }
}
