import CircuitFakes
import Testing

@testable import OAIToCircuit

/// The OAuth2 token cache (section 4.2 step 5).
@Suite(.timeLimit(.minutes(1))) struct TokenTests {
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
            harness.clock.advance(by: TokenProvider.minimumAgeForForcedRefresh)
            harness.tokens.revoke("access-token-1")
            let answer = try await harness.chat(Harness.chatBody())
            #expect(answer.status == 200)
            #expect(await harness.tokens.requests.count == 2)
            let keys = await harness.circuit.requests.entries.compactMap { $0.headers["api-key"] }
            #expect(keys == ["access-token-1", "access-token-1", "access-token-2"])
            #expect(await harness.recorder.usage.count == 2)
        }
    }

    @Test func streamedRequestIsRetriedAfter401Too() async throws {
        try await Harness.with { harness async throws in
            _ = try await harness.chat(Harness.chatBody())
            harness.clock.advance(by: TokenProvider.minimumAgeForForcedRefresh)
            harness.tokens.revoke("access-token-1")
            let answer = try await harness.chat(Harness.chatBody(stream: true))
            #expect(answer.status == 200 && answer.body.hasSuffix("data: [DONE]\n\n"))
            #expect(await harness.tokens.requests.count == 2)
        }
    }

    @Test func a401ToAFreshTokenIsPassedThroughWithoutAskingForAnother() async throws {
        // A 401 that is not about the token (Circuit refuses a bad appkey with 401 too) must not let any client make
        // the bridge fetch a token per request.
        try await Harness.with { harness async throws in
            for _ in 0..<5 {
                let answer = try await harness.chat(#"{"model": "gpt-4o", "messages": [], "user": "not json"}"#)
                #expect(answer.status == 401)
            }
            #expect(await harness.tokens.requests.count == 1)
            #expect(await harness.circuit.requests.count == 5)
        }
    }

    @Test func secondUpstream401IsPassedToTheClient() async throws {
        var refusing = FakeCircuit.Settings()
        refusing.refuseEveryToken = true
        try await Harness.with(circuitSettings: refusing) { harness async throws in
            _ = try await harness.chat(Harness.chatBody())
            harness.clock.advance(by: TokenProvider.minimumAgeForForcedRefresh)
            let answer = try await harness.chat(Harness.chatBody())
            #expect(answer.status == 401)
            #expect(answer.error?["message"] as? String == "Access denied due to invalid subscription key or wrong API endpoint.")
            // One refresh and one retry for the second chat; the first one's token was too fresh to drop.
            #expect(await harness.tokens.requests.count == 2)
            #expect(await harness.circuit.requests.count == 3)
            // Circuit answered, so the requests are accounted with Circuit's status.
            #expect(await harness.recorder.usage.entries.map(\.statusCode) == [401, 401])
        }
    }

    @Test func failedRefreshIsRetriedByTheNextRequest() async throws {
        var failing = FakeTokenEndpoint.Settings()
        failing.failWithStatus = 503
        try await Harness.with(tokenSettings: failing) { harness async throws in
            expectError(try await harness.chat(Harness.chatBody()), status: 502, code: "upstream_auth_failed")
            harness.tokens.settings.withLockedValue { $0.failWithStatus = nil }
            // Within the back-off the bridge does not ask again…
            expectError(try await harness.chat(Harness.chatBody()), status: 502, code: "upstream_auth_failed")
            #expect(await harness.tokens.requests.count == 1)
            // …after it, it does.
            harness.clock.advance(by: TokenProvider.failureBackoff)
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
            #expect(await harness.tokens.requests.count == 2)
        }
    }

    @Test func aTokenStillValidKeepsServingWhileTheIdentityServiceIsDown() async throws {
        try await Harness.with { harness async throws in
            _ = try await harness.chat(Harness.chatBody())
            harness.clock.advance(by: 3600 - 30)
            harness.tokens.settings.withLockedValue { $0.failWithStatus = 503 }
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
            #expect(await harness.tokens.requests.count == 2)
            harness.clock.advance(by: 31)
            expectError(try await harness.chat(Harness.chatBody()), status: 502, code: "upstream_auth_failed")
        }
    }

    @Test func shortLivedTokensAreRefreshedHalfwayAndConcurrentRefreshesAfterExpiryAreShared() async throws {
        var settings = FakeTokenEndpoint.Settings()
        settings.expiresIn = 100
        settings.delay = .milliseconds(200)
        try await Harness.with(tokenSettings: settings) { harness async throws in
            _ = try await harness.chat(Harness.chatBody())
            harness.clock.advance(by: 49)
            _ = try await harness.chat(Harness.chatBody())
            #expect(await harness.tokens.requests.count == 1)
            harness.clock.advance(by: 2)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<20 {
                    group.addTask {
                        let answer = try await harness.chat(Harness.chatBody())
                        #expect(answer.status == 200)
                    }
                }
                try await group.waitForAll()
            }
            #expect(await harness.tokens.requests.count == 2)
        }
    }
}
