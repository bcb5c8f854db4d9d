import Foundation
import Testing

@testable import OAIToCircuit

/// Section 5.1's last rule: a policy reloads when its file changes (or on SIGHUP, see scripts/sdk_check.py), and a
/// bad one keeps the old one in force, logged and shown in `/health`.
@Suite(.timeLimit(.minutes(1))) struct PolicyReloadTests {
    static func write(_ text: String, to url: URL) throws {
        try Data(text.utf8).write(to: url, options: .atomic)
    }

    @Test func aBrokenFileKeepsTheOldPolicyAndAGoodOneReplacesIt() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("quotas.json")
        try Self.write(#"{"alice": {"*": {"requests": 100}}}"#, to: file)
        try await Harness.with(environment: ["QUOTAS_JSON_PATH": file.path], directory: directory) { harness async throws in
            let reloader = harness.assembly.reloader
            #expect(try await harness.chat(Harness.chatBody(), subkey: "alice").status == 200)

            try Self.write(#"{"alice": {"*": {"requests": "many"}}, "bob": {}}"#, to: file)
            await reloader.reloadIfChanged()
            #expect(try await harness.chat(Harness.chatBody(), subkey: "alice").status == 200)
            expectError(try await harness.chat(Harness.chatBody(), subkey: "bob"), status: 403, code: "unauthorized_subkey")
            let health = try await harness.request(.GET, "/health")
            #expect(health.status == 200 && health.json?["status"] as? String == "healthy")
            let quotas = try #require(health.json?["quotas"] as? [String: Any])
            let error = try #require(quotas["reload_error"] as? String)
            #expect(error.contains("requests must be a whole number or null") && error.contains(Caller.hash("alice")))
            #expect(quotas["subkeys"] as? Int == 1)
            #expect(harness.logs.all.contains { $0.contains("quota policy rejected; the previous policy stays in force") })
            // Nothing in the log or in /health names a key in plaintext.
            #expect(!harness.logs.all.contains { $0.contains("alice") } && !health.body.contains("alice"))

            try Self.write(#"{"bob": {"o3": {"requests": 0}}}"#, to: file)
            await reloader.reloadIfChanged()
            expectError(try await harness.chat(Harness.chatBody(), subkey: "alice"), status: 403, code: "unauthorized_subkey")
            #expect(try await harness.chat(Harness.chatBody(), subkey: "bob").status == 200)
            expectError(
                try await harness.chat(Harness.chatBody(model: "o3"), subkey: "bob"),
                status: 403,
                code: "model_not_allowed"
            )
            let healed = try #require(try await harness.request(.GET, "/health").json?["quotas"] as? [String: Any])
            #expect(healed["reload_error"] is NSNull && healed["subkeys"] as? Int == 1)
        }
    }

    @Test func aPolicyFileThatVanishesKeepsThePolicyInForce() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("quotas.json")
        try Self.write(#"{"alice": {}}"#, to: file)
        try await Harness.with(environment: ["QUOTAS_JSON_PATH": file.path], directory: directory) { harness async throws in
            try FileManager.default.removeItem(at: file)
            await harness.assembly.reloader.reloadIfChanged()
            #expect(try await harness.chat(Harness.chatBody(), subkey: "alice").status == 200)
            let quotas = try #require(try await harness.request(.GET, "/health").json?["quotas"] as? [String: Any])
            #expect(quotas["reload_error"] as? String == "\(file.path): no such file")
        }
    }

    @Test func sighupReReadsTheEarlierBridgesKeyStatesAndNames() async throws {
        try await Harness.with(environment: ["QUOTAS_JSON": #"{"alice": {}, "bob": {}}"#]) { harness async throws in
            #expect(try await harness.chat(Harness.chatBody(), subkey: "alice").status == 200)
            // The earlier bridge's tools revoke alice and name bob, in the same file, while this bridge runs.
            try TestDatabase.execute(harness.databasePath, TestDatabase.earlierNewerTables)
            try TestDatabase.execute(
                harness.databasePath,
                """
                INSERT INTO key_lifecycle (subkey, status, revoke_reason) VALUES ('alice', 'revoked', 'left');
                INSERT INTO subkey_names (subkey, friendly_name, email) VALUES ('bob', 'Bob', 'bob@example.com');
                """
            )
            await harness.assembly.reloader.reload(trigger: "SIGHUP")
            expectError(try await harness.chat(Harness.chatBody(), subkey: "alice"), status: 403, code: "unauthorized_subkey")
            #expect(try await harness.chat(Harness.chatBody(), subkey: "bob").status == 200)
            let bob = try #require(await harness.recorder.usage.entries.last)
            #expect(bob.caller.friendlyName == "Bob" && bob.caller.email == "bob@example.com")
        }
    }

    @Test func aChangedFileIsNoticedWithoutASignal() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("quotas.json")
        // No file at start: nobody is authorised, and the file is picked up when it appears.
        try await Harness.with(
            environment: ["QUOTAS_JSON_PATH": file.path],
            directory: directory,
            policyPollInterval: .milliseconds(20)
        ) { harness async throws in
            expectError(try await harness.chat(Harness.chatBody(), subkey: "carol"), status: 403, code: "unauthorized_subkey")
            let health = try #require(try await harness.request(.GET, "/health").json?["quotas"] as? [String: Any])
            #expect(health["file_exists"] as? Bool == false)
            try Self.write(#"{"carol": {}}"#, to: file)
            var outcomes = harness.assembly.reloader.outcomes.makeAsyncIterator()
            #expect(await outcomes.next() == .loaded(subkeys: 1))
            #expect(try await harness.chat(Harness.chatBody(), subkey: "carol").status == 200)
        }
    }

    @Test func aPolicyChangeAppliesToCountersAlreadyKept() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("quotas.json")
        try Self.write(#"{"k": {"gpt-4o": {"requests": 5}}}"#, to: file)
        try await Harness.with(environment: ["QUOTAS_JSON_PATH": file.path], directory: directory) { harness async throws in
            for _ in 0..<3 { #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200) }
            // Lowered below what is already used: refused at once.
            try Self.write(#"{"k": {"gpt-4o": {"requests": 3}}}"#, to: file)
            await harness.assembly.reloader.reloadIfChanged()
            expectError(try await harness.chat(Harness.chatBody(), subkey: "k"), status: 429, code: "quota_exceeded")
            // Made monthly: this month's count is the same three, so still refused, now with a Retry-After.
            try Self.write(#"{"k": {"gpt-4o": {"requests": 3, "period": "monthly"}}}"#, to: file)
            await harness.assembly.reloader.reloadIfChanged()
            let refused = try await harness.chat(Harness.chatBody(), subkey: "k")
            #expect(refused.status == 429 && refused.headers.first(name: "retry-after") != nil)
            try Self.write(#"{"k": {"gpt-4o": {"requests": 4, "period": "daily"}}}"#, to: file)
            await harness.assembly.reloader.reloadIfChanged()
            #expect(try await harness.chat(Harness.chatBody(), subkey: "k").status == 200)
        }
    }

    @Test func anInvalidPolicyAtStartIsAConfigurationErrorNamingTheVariable() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("quotas.json")
        try Self.write(#"{"k": {"*": {"period": "hourly"}}}"#, to: file)
        let error = await #expect(throws: ConfigurationError.self) {
            try await Harness.with(environment: ["QUOTAS_JSON_PATH": file.path], directory: directory) { _ in }
        }
        #expect(error?.name == "QUOTAS_JSON_PATH")
        #expect(error?.problem.hasPrefix(file.path + ": subkey entry #1") == true)
        #expect(error?.problem.contains("period must be") == true)
    }
}
