import AsyncHTTPClient
import CircuitFakes
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import Testing

@testable import OAIToCircuit

/// Sections 4.2 step 1 and 5.2 against the live bridge: who is authorised, atomic reservations, token limits,
/// periods and `Retry-After`, blocked models, anonymous access.
@Suite(.timeLimit(.minutes(1))) struct QuotaEnforcementTests {
    static func policy(_ json: String) -> [String: String] { ["QUOTAS_JSON": json] }

    @Test func twoHundredConcurrentRequestsAgainstFiftyLeftAdmitExactlyFifty() async throws {
        try await Harness.with(environment: Self.policy(#"{"k": {"gpt-4o": {"requests": 60}}}"#)) { harness async throws in
            for _ in 0..<10 {
                #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            }
            let statuses = try await withThrowingTaskGroup(of: Int.self) { group in
                for _ in 0..<200 {
                    group.addTask { try await harness.chat(Harness.chatBody(), subkey: "k").status }
                }
                return try await group.reduce(into: [Int]()) { $0.append($1) }
            }
            #expect(statuses.count { $0 == 200 } == 50)
            #expect(statuses.count { $0 == 429 } == 150)
            #expect(try TestDatabase.usage(harness.databasePath, subkey: "k", model: "gpt-4o")?.requests == 60)
            #expect(try TestDatabase.count(harness.databasePath, "SELECT count(*) FROM request_log") == 60)
            let refused = try await harness.chat(Harness.chatBody(), subkey: "k")
            expectError(
                refused,
                status: 429,
                code: "quota_exceeded",
                message: "Quota exceeded for this subkey and model (requests)"
            )
            // A lifetime limit never starts again, so there is no Retry-After.
            #expect(refused.headers.first(name: "retry-after") == nil)
            // Counters are per model: another model is not affected.
            #expect(try await harness.chat(Harness.chatBody(model: "o3"), subkey: "k").status == 200)
        }
    }

    @Test func aTokenLimitStopsAdmissionOnceReached() async throws {
        // Each answer of the fake uses 18 tokens: two answers reach 36 ≥ 30, so the third request is refused.
        try await Harness.with(environment: Self.policy(#"{"k": {"*": {"total_tokens": 30}}}"#)) { harness async throws in
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            let refused = try await harness.chat(Harness.chatBody(), subkey: "k")
            expectError(
                refused,
                status: 429,
                code: "quota_exceeded",
                message: "Quota exceeded for this subkey and model (tokens)"
            )
            #expect(try TestDatabase.usage(harness.databasePath, subkey: "k", model: "gpt-4o")?.totalTokens == 36)
            // Streamed tokens count too (15 a stream here), charged when the stream ends.
            #expect(try await harness.chat(Harness.chatBody(model: "o3", stream: true), subkey: "k").status == 200)
            #expect(try await harness.chat(Harness.chatBody(model: "o3", stream: true), subkey: "k").status == 200)
            #expect(harness.assembly.enforcer.tally(keyID: Caller.hash("k"), model: "o3", period: .lifetime).totalTokens == 30)
            expectError(try await harness.chat(Harness.chatBody(model: "o3"), subkey: "k"), status: 429, code: "quota_exceeded")
        }
    }

    @Test func whenBothLimitsAreUsedUpTheMessageNamesRequests() async throws {
        try await Harness.with(environment: Self.policy(#"{"k": {"*": {"requests": 1, "total_tokens": 1}}}"#)) {
            harness async throws in
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            expectError(
                try await harness.chat(Harness.chatBody(), subkey: "k"),
                status: 429,
                code: "quota_exceeded",
                message: "Quota exceeded for this subkey and model (requests)"
            )
        }
    }

    @Test func aMonthlyLimitStartsAgainAtTheMonthBoundary() async throws {
        let policy = Self.policy(#"{"k": {"gpt-4o": {"requests": 2, "period": "monthly"}}}"#)
        try await Harness.with(environment: policy) { harness async throws in
            // Start ten seconds before the end of the month.
            let now = harness.bridge.clock.now()
            let monthEnd = try #require(PeriodCalendar.end(of: .monthly, at: now))
            harness.clock.advance(by: monthEnd - now - 10)
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            let refused = try await harness.chat(Harness.chatBody(), subkey: "k")
            expectError(refused, status: 429, code: "quota_exceeded")
            let retryAfter = try #require(refused.headers.first(name: "retry-after").flatMap { Int($0) })
            #expect((10...11).contains(retryAfter))
            harness.clock.advance(by: Double(retryAfter))
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            // Lifetime totals keep counting across months; each month has its own row.
            #expect(try TestDatabase.usage(harness.databasePath, subkey: "k", model: "gpt-4o")?.requests == 3)
            let months = try TestDatabase.rows(
                harness.databasePath,
                "SELECT period_start, requests FROM usage_period WHERE period = 'monthly' ORDER BY period_start"
            )
            #expect(months.map { $0["requests"] as Int } == [2, 1])
        }
    }

    @Test func aDailyLimitSaysWhenTheDayEnds() async throws {
        let policy = Self.policy(#"{"k": {"*": {"requests": 1, "period": "daily"}}}"#)
        try await Harness.with(environment: policy) { harness async throws in
            let now = harness.bridge.clock.now()
            let dayEnd = try #require(PeriodCalendar.end(of: .daily, at: now))
            harness.clock.advance(by: dayEnd - now - 3600.5)
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            let refused = try await harness.chat(Harness.chatBody(), subkey: "k")
            #expect(refused.headers.first(name: "retry-after") == "3601")
            harness.clock.advance(by: 3601)
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
        }
    }

    @Test func aBlockedModelIs403AndIsNotListed() async throws {
        let policy = Self.policy(#"{"k": {"o3": {"requests": 0}, "re:gemini-.*": {"total_tokens": -1}}}"#)
        try await Harness.with(environment: policy) { harness async throws in
            expectError(
                try await harness.chat(Harness.chatBody(model: "o3"), subkey: "k"),
                status: 403,
                code: "model_not_allowed",
                message: "Model 'o3' is not allowed for this subkey"
            )
            expectError(
                try await harness.chat(Harness.chatBody(model: "gemini-2.5-pro"), subkey: "k"),
                status: 403,
                code: "model_not_allowed"
            )
            #expect(await harness.circuit.requests.entries.isEmpty)
            let listed = try #require(
                try await harness.request(.GET, "/v1/models", subkey: "k").json?["data"] as? [[String: Any]]
            )
            #expect(Set(listed.compactMap { $0["id"] as? String }) == ["gpt-4.1", "gpt-4o-mini", "gpt-4o", "o4-mini"])
            expectError(try await harness.request(.GET, "/v1/models/o3", subkey: "k"), status: 404, code: "model_not_found")
            let refusals = await harness.recorder.refusals.entries
            #expect(refusals.map(\.error.code) == ["model_not_allowed", "model_not_allowed"])
            #expect(refusals.first?.model == "o3" && refusals.first?.caller?.keyID == Caller.hash("k"))
        }
    }

    @Test func anUnknownSubkeyIs403Everywhere() async throws {
        try await Harness.with(environment: Self.policy(#"{"k": {}, "_REVOKED_old": {}}"#)) { harness async throws in
            for subkey in ["stranger", "_REVOKED_old", "K", "k2"] {
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: subkey),
                    status: 403,
                    code: "unauthorized_subkey",
                    message: "Unauthorized: Subkey not recognized. Please contact administrator."
                )
            }
            expectError(
                try await harness.request(.GET, "/v1/models", subkey: "stranger"),
                status: 403,
                code: "unauthorized_subkey"
            )
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            #expect(await harness.circuit.requests.entries.count == 1)
        }
    }

    @Test func withoutASubkeyRequestsAreAnonymousWhenAllowedAndUnknownSubkeysStillRefused() async throws {
        let environment = ["REQUIRE_SUBKEY": "false", "QUOTAS_JSON": #"{"k": {"*": {"requests": 0}}}"#]
        try await Harness.with(environment: environment) { harness async throws in
            #expect(try await harness.chat(Harness.chatBody(), subkey: nil).status == 200)
            #expect(try await harness.chat(Harness.chatBody(), subkey: nil).status == 200)
            expectError(try await harness.chat(Harness.chatBody(), subkey: "stranger"), status: 403, code: "unauthorized_subkey")
            expectError(try await harness.chat(Harness.chatBody(), subkey: "k"), status: 403, code: "model_not_allowed")
            #expect(try TestDatabase.usage(harness.databasePath, subkey: "anonymous", model: "gpt-4o")?.requests == 2)
            let log = try TestDatabase.rows(harness.databasePath, "SELECT key_id, subkey_hash FROM request_log")
            #expect(log.allSatisfy { $0["key_id"] as String == "anonymous" && $0["subkey_hash"] as String == "anonymous" })
        }
    }

    @Test func aReservationIsGivenBackWhenCircuitIsNeverReached() async throws {
        var tokens = FakeTokenEndpoint.Settings()
        tokens.failWithStatus = 500
        let policy = Self.policy(#"{"k": {"*": {"requests": 1}}}"#)
        try await Harness.with(environment: policy, tokenSettings: tokens) { harness async throws in
            for _ in 0..<3 {
                expectError(try await harness.chat(Harness.chatBody(), subkey: "k"), status: 502, code: "upstream_auth_failed")
            }
            harness.tokens.settings.withLockedValue { $0.failWithStatus = nil }
            harness.clock.advance(by: TokenProvider.failureBackoff)
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
            expectError(try await harness.chat(Harness.chatBody(), subkey: "k"), status: 429, code: "quota_exceeded")
            #expect(try TestDatabase.usage(harness.databasePath, subkey: "k", model: "gpt-4o")?.requests == 1)
        }
    }

    @Test func circuitsOwnErrorsCount() async throws {
        try await Harness.with(environment: Self.policy(#"{"k": {"*": {"requests": 1}}}"#)) { harness async throws in
            #expect(try await harness.chat(Harness.chatBody(model: "bad-request"), subkey: "k").status == 400)
            expectError(
                try await harness.chat(Harness.chatBody(model: "bad-request"), subkey: "k"),
                status: 429,
                code: "quota_exceeded"
            )
            let row = try #require(try TestDatabase.rows(harness.databasePath, "SELECT status_code FROM request_log").first)
            #expect(row["status_code"] as Int == 400)
        }
    }

    @Test func aManagedKeyOfTheRegistryWinsOverThePolicyFile() async throws {
        let registry = TestRegistry()
        let digest = SubkeyDigest("managed-secret")
        registry.keys.withLockedValue {
            $0[digest] = ManagedKey(
                keyID: "key_dana",
                friendlyName: "Dana",
                email: "dana@example.com",
                template: "basic",
                rules: [(try! ModelPattern("gpt-4o"), QuotaRule(requests: .limit(1)))]
            )
        }
        // The policy file names the same key without limits: the registry's rules apply.
        let policy = #"{"_templates": {"basic": {"rules": {"o3": {"requests": 0}}}}, "managed-secret": {}}"#
        try await Harness.with(environment: ["QUOTAS_JSON": policy], registry: registry) { harness async throws in
            #expect(try await harness.chat(Harness.chatBody(), subkey: "managed-secret").status == 200)
            expectError(try await harness.chat(Harness.chatBody(), subkey: "managed-secret"), status: 429, code: "quota_exceeded")
            expectError(
                try await harness.chat(Harness.chatBody(model: "o3"), subkey: "managed-secret"),
                status: 403,
                code: "model_not_allowed"
            )
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.caller.keyID == "key_dana" && record.caller.friendlyName == "Dana")
            // The ledger names a managed key by its id, never by its secret.
            #expect(try TestDatabase.usage(harness.databasePath, subkey: "key_dana", model: "gpt-4o")?.requests == 1)
            #expect(try TestDatabase.usage(harness.databasePath, subkey: "managed-secret", model: "gpt-4o") == nil)
            // Revoked: refused on the next request, without a restart.
            registry.revoke(digest)
            expectError(
                try await harness.chat(Harness.chatBody(model: "gpt-4.1"), subkey: "managed-secret"),
                status: 403,
                code: "unauthorized_subkey"
            )
        }
    }
}

/// Managed keys in memory, as the keys registry will hold them.
final class TestRegistry: KeyRegistry {
    let keys = NIOLockedValueBox<[SubkeyDigest: ManagedKey]>([:])
    private let changes = NIOLockedValueBox(0)

    func key(for digest: SubkeyDigest) -> ManagedKey? { keys.withLockedValue { $0[digest] } }
    func contains(keyID: String) -> Bool { keys.withLockedValue { $0.values.contains { $0.keyID == keyID } } }
    var generation: Int { changes.withLockedValue { $0 } }

    func revoke(_ digest: SubkeyDigest) {
        keys.withLockedValue { $0[digest]?.isActive = false }
        changes.withLockedValue { $0 += 1 }
    }
}
