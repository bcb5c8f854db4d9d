import ArgumentParser
import Foundation
import GRDB
import Testing

@testable import OAIToCircuit

/// The keys registry: key format, hashes only, revocation and rotation against the running bridge, import from the
/// earlier bridge's files, concurrent commands.
@Suite(.timeLimit(.minutes(2))) struct KeysTests {
    /// A `keys` command as another process would run it: its own connection to the bridge's database, the bell beside
    /// it, and the harness's clock.
    static func administrator(_ path: String, clock: BridgeClock = .system) throws -> (KeyAdministrator, SQLiteLedger) {
        let ledger = try SQLiteLedger.open(path: path)
        let bell = KeyChangeBell(databasePath: path, create: true)
        return (KeyAdministrator(ledger: ledger, clock: clock, bell: bell), ledger)
    }

    /// Runs `body` with such an administrator on the harness's database and clock, closing its connection after.
    static func withAdministrator(_ harness: Harness, _ body: (KeyAdministrator) async throws -> Void) async throws {
        let (administrator, ledger) = try administrator(harness.databasePath, clock: harness.clock.bridgeClock)
        do {
            try await body(administrator)
        } catch {
            try? await ledger.close()
            throw error
        }
        try await ledger.close()
    }

    /// Every byte of every file in `directory` (the database, its WAL and shared memory, the bell).
    static func filesContain(_ needle: String, in directory: URL) throws -> Bool {
        let needle = Array(needle.utf8)
        for name in try FileManager.default.contentsOfDirectory(atPath: directory.path) {
            let bytes = Array(try Data(contentsOf: directory.appendingPathComponent(name)))
            guard bytes.count >= needle.count else { continue }
            for start in 0...(bytes.count - needle.count) where bytes[start] == needle[0] {
                if Array(bytes[start..<(start + needle.count)]) == needle { return true }
            }
        }
        return false
    }

    // MARK: Format

    @Test func keysAreURLSafeCarryTheirIdAndAreUniformlyRandom() throws {
        #expect(KeyFormat.secretBits >= 192)
        var seen: Set<String> = []
        var counts: [UInt8: Int] = [:]
        let rounds = 2_000
        for _ in 0..<rounds {
            let id = KeyFormat.newID()
            let secret = KeyFormat.newSecret()
            let key = KeyFormat.key(prefix: "oai", id: id, secret: secret)
            #expect(key.wholeMatch(of: /oai_[a-km-np-z2-9]{12}_[A-Za-z0-9]{40}/) != nil, "\(key)")
            #expect(KeyFormat.embeddedID(in: key) == id)
            #expect(seen.insert(secret).inserted)
            for byte in secret.utf8 { counts[byte, default: 0] += 1 }
        }
        // Every one of the 62 letters appears about equally often: a chi-squared statistic with 61 degrees of freedom
        // stays far below 130 (p < 1e-6) unless the generator is biased (a modulo bias alone adds hundreds).
        #expect(counts.count == 62)
        let expected = Double(rounds * KeyFormat.secretLength) / 62
        let chiSquared = counts.values.reduce(0.0) { $0 + pow(Double($1) - expected, 2) / expected }
        #expect(chiSquared < 130, "chi-squared \(chiSquared)")
        // A prefix may hold '_' (the earlier bridge's keys did): the id is found from the right.
        let key = KeyFormat.key(prefix: "fie_alice", id: "abcdefghijk2", secret: KeyFormat.newSecret())
        #expect(KeyFormat.embeddedID(in: key) == "abcdefghijk2")
        #expect(KeyFormat.embeddedID(in: "team_member_alice") == nil)
        #expect(KeyFormat.validatePrefix("sk-team_1") == nil)
        for bad in ["", "_x", "a b", "ключ", String(repeating: "a", count: 33)] {
            #expect(KeyFormat.validatePrefix(bad) != nil, "\(bad)")
        }
    }

    @Test func gracePeriodsReadAsOperatorsWriteThem() {
        #expect(DurationText.seconds("0") == 0)
        #expect(DurationText.seconds("90") == 90)
        #expect(DurationText.seconds("30m") == 1_800)
        #expect(DurationText.seconds("1h30m") == 5_400)
        #expect(DurationText.seconds("7d") == 604_800)
        #expect(DurationText.seconds("1.5h") == 5_400)
        for bad in ["", "-1", "1x", "h", "1h30", "tomorrow"] { #expect(DurationText.seconds(bad) == nil, "\(bad)") }
    }

    // MARK: Storage

    @Test func theDatabaseNeverHoldsAKeyInPlaintext() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        let (administrator, ledger) = try Self.administrator(path)
        var new = KeyAdministrator.NewKey(name: "Alice Example", email: "alice@example.com")
        new.rules = try QuotaPolicy.parseRules(Array(#"{"gpt-4o": {"requests": 5}}"#.utf8), source: "test")
        let issued = try await administrator.create(new, policy: nil)
        let rotated = try await administrator.rotate(issued.record.id, grace: 60)
        try await ledger.close()
        #expect(issued.key.hasPrefix("oai_\(issued.record.id)_"))
        for key in [issued.key, rotated.key] {
            let secret = String(key.split(separator: "_").last!)
            #expect(try !Self.filesContain(secret, in: directory))
            #expect(try !Self.filesContain(key, in: directory))
        }
        // What is stored: the hashes, and the id, name and rules.
        let hashes = try TestDatabase.rows(path, "SELECT hash FROM managed_key_secret").map { Array($0["hash"] as Data) }
        #expect(Set(hashes) == [KeyFormat.hash(issued.key), KeyFormat.hash(rotated.key)])
        #expect(try Self.filesContain("Alice Example", in: directory))
        let rules = try TestDatabase.rows(path, "SELECT rules FROM managed_key").first?["rules"] as String?
        #expect(rules == #"{"gpt-4o": {"requests": 5}}"#)
    }

    @Test func concurrentCreatesAllLandAndANameIsTakenOnce() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        // The first open creates and migrates the file; then each command has a connection of its own.
        try await SQLiteLedger.open(path: path).close()
        let administrators = try (0..<12).map { _ in try Self.administrator(path) }
        let created = try await withThrowingTaskGroup(of: KeyAdministrator.Issued.self) { group in
            for (index, (administrator, _)) in administrators.enumerated() {
                group.addTask { try await administrator.create(.init(name: "user \(index)"), policy: nil) }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(Set(created.map(\.record.id)).count == 12)
        #expect(Set(created.map(\.key)).count == 12)
        let sameName = await withTaskGroup(of: Bool.self) { group in
            for (administrator, _) in administrators {
                group.addTask { (try? await administrator.create(.init(name: "Shared"), policy: nil)) != nil }
            }
            return await group.reduce(into: 0) { $0 += $1 ? 1 : 0 }
        }
        #expect(sameName == 1)
        for (_, ledger) in administrators { try await ledger.close() }
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM managed_key") == 13)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM managed_key_secret") == 13)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM managed_key_history") == 13)
    }

    // MARK: Against the running bridge

    @Test func aNewKeyWorksAtOnceAndARevokedOneIsRefusedOnItsNextRequest() async throws {
        try await Harness.with { harness in
            try await Self.withAdministrator(harness) { administrator in
                let issued = try await administrator.create(
                    .init(name: "Dana", email: "dana@example.com"),
                    policy: nil
                )
                let id = issued.record.id
                #expect(try await harness.chat(Harness.chatBody(), subkey: issued.key).status == 200)
                #expect(try await harness.chat(Harness.chatBody(), subkey: issued.key).status == 200)
                let record = try #require(await harness.recorder.usage.entries.last)
                #expect(record.caller.keyID == id)
                #expect(record.caller.friendlyName == "Dana" && record.caller.email == "dana@example.com")
                // The ledger names it by its id, with its name and e-mail in the request log.
                #expect(try TestDatabase.usage(harness.databasePath, subkey: id, model: "gpt-4o")?.requests == 2)
                let log = try TestDatabase.rows(harness.databasePath, "SELECT * FROM request_log WHERE key_id = ?", [id])
                #expect(log.count == 2 && log.allSatisfy { $0["friendly_name"] == "Dana" && $0["email"] == "dana@example.com" })
                let listed = try #require(try await administrator.list().first)
                #expect(listed.usage.requests == 2 && listed.lastUsed == record.finishedAt)

                _ = try await administrator.revoke("dana", reason: "left the team")
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: issued.key),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                expectError(
                    try await harness.request(.GET, "/v1/models", subkey: issued.key),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                // A key that differs in one letter is unknown, not a near miss.
                var near = Array(issued.key.utf8)
                near[near.count - 1] = near[near.count - 1] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: String(decoding: near, as: UTF8.self)),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                await #expect(throws: KeyAdminError.self) { try await administrator.rotate(id, grace: 0) }
                let history = try await administrator.show(id).history.map(\.action)
                #expect(history == ["created", "revoked"])

                // A command that could not ring the bell: the bridge's poll of the registry's version finds the change.
                let (silent, silentLedger) = try Self.administrator(harness.databasePath, clock: harness.clock.bridgeClock)
                let other = try await silent.create(.init(name: "Olga"), policy: nil)
                let keys = try #require(harness.assembly.keys)
                await keys.poll()
                #expect(try await harness.chat(Harness.chatBody(), subkey: other.key).status == 200)
                // A leaked key can be revoked by itself; an unknown one is never repeated in the message.
                _ = try await KeyAdministrator(ledger: silentLedger, clock: harness.clock.bridgeClock).revoke(
                    other.key,
                    reason: "x"
                )
                #expect(!KeyAdministrator.notFound(other.key).message.contains(other.key.split(separator: "_").last!))
                await keys.poll()
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: other.key),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                try await silentLedger.close()
            }
        }
    }

    @Test func aRotatedSecretWorksUntilItsGraceEnds() async throws {
        try await Harness.with { harness in
            try await Self.withAdministrator(harness) { administrator in
                var new = KeyAdministrator.NewKey(name: "Erin")
                new.prefix = "team-x"
                new.rules = try QuotaPolicy.parseRules(Array(#"{"gpt-4o": {"requests": 4}}"#.utf8), source: "test")
                let first = try await administrator.create(new, policy: nil)
                #expect(try await harness.chat(Harness.chatBody(), subkey: first.key).status == 200)

                let second = try await administrator.rotate("Erin", grace: 3_600)
                #expect(second.record.id == first.record.id && second.key != first.key)
                #expect(second.key.hasPrefix("team-x_\(first.record.id)_"))
                #expect(second.previousValidUntil == harness.clock.bridgeClock.now() + 3_600)
                // Both work during the grace, against one allowance.
                #expect(try await harness.chat(Harness.chatBody(), subkey: first.key).status == 200)
                #expect(try await harness.chat(Harness.chatBody(), subkey: second.key).status == 200)
                harness.clock.advance(by: 3_599)
                #expect(try await harness.chat(Harness.chatBody(), subkey: first.key).status == 200)
                harness.clock.advance(by: 1)
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: first.key),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                // The counters, history and id stayed: the allowance of 4 is spent.
                expectError(try await harness.chat(Harness.chatBody(), subkey: second.key), status: 429, code: "quota_exceeded")
                #expect(try TestDatabase.usage(harness.databasePath, subkey: first.record.id, model: "gpt-4o")?.requests == 4)

                // A rotation without grace stops the previous secret at once.
                let third = try await administrator.rotate(first.record.id, grace: 0)
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: second.key),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                expectError(try await harness.chat(Harness.chatBody(), subkey: third.key), status: 429, code: "quota_exceeded")
                #expect(try await administrator.show("erin").history.map(\.action) == ["created", "rotated", "rotated"])
            }
        }
    }

    @Test func aRegistryKeyFollowsGlobalThenTemplateThenItsOwnRules() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let policyPath = directory.appendingPathComponent("quotas.json")
        let policy = """
            {"_global": {"*": {"requests": 100}, "o3": {"requests": 0}},
             "_templates": {"trial": {"rules": {"gpt-4o": {"requests": 2}, "gpt-4.1": {"requests": 1}}}}}
            """
        try Data(policy.utf8).write(to: policyPath)
        try await Harness.with(environment: ["QUOTAS_JSON_PATH": policyPath.path], directory: directory) { harness in
            try await Self.withAdministrator(harness) { administrator in
                var new = KeyAdministrator.NewKey(name: "Frank")
                new.template = "trial"
                new.rules = try QuotaPolicy.parseRules(Array(#"{"gpt-4.1": {"requests": 3}}"#.utf8), source: "test")
                await #expect(throws: KeyAdminError.self) { try await administrator.create(new, policy: nil) }
                let loaded = try PolicySource.file(policyPath.path).load()
                let key = try await administrator.create(new, policy: loaded).key
                expectError(
                    try await harness.chat(Harness.chatBody(model: "o3"), subkey: key),
                    status: 403,
                    code: "model_not_allowed"
                )
                for _ in 0..<2 { #expect(try await harness.chat(Harness.chatBody(), subkey: key).status == 200) }
                expectError(try await harness.chat(Harness.chatBody(), subkey: key), status: 429, code: "quota_exceeded")
                for _ in 0..<3 { #expect(try await harness.chat(Harness.chatBody(model: "gpt-4.1"), subkey: key).status == 200) }
                expectError(
                    try await harness.chat(Harness.chatBody(model: "gpt-4.1"), subkey: key),
                    status: 429,
                    code: "quota_exceeded"
                )

                // A policy without the template the key uses loads (the other keys keep working); the key refuses
                // every model, since its limits are unknown, and the log says why.
                var outcomes = harness.assembly.reloader.outcomes.makeAsyncIterator()
                try Data(#"{"_global": {"*": {"requests": 100}}, "_users": {"other": {}}}"#.utf8).write(to: policyPath)
                await harness.assembly.reloader.reload(trigger: "test")
                #expect(await outcomes.next() == .loaded(subkeys: 1))
                let id = try #require(try await administrator.list().first?.record.id)
                #expect(harness.logs.all.contains { $0.contains("_templates lacks 'trial' (keys \(id))") })
                for model in ["gpt-4.1", "gpt-4o-mini"] {
                    expectError(
                        try await harness.chat(Harness.chatBody(model: model), subkey: key),
                        status: 403,
                        code: "model_not_allowed"
                    )
                }
                #expect(try await harness.chat(Harness.chatBody(model: "gpt-4o-mini"), subkey: "other").status == 200)
                // Without the template, it works again from the next request.
                var changes = KeyAdministrator.Changes()
                changes.template = .some(nil)
                _ = try await administrator.update(id, changes, policy: nil)
                #expect(try await harness.chat(Harness.chatBody(model: "gpt-4o-mini"), subkey: key).status == 200)
            }
        }
    }

    @Test func withoutABellTheRegistryIsPolled() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        // A directory where the bell should be: neither the bridge nor the command can open it.
        try FileManager.default.createDirectory(
            atPath: KeyChangeBell.path(forDatabase: directory.appendingPathComponent("quota.db").path),
            withIntermediateDirectories: false
        )
        // The test polls by hand (a timer's poll could come between the create and the first request).
        try await Harness.with(directory: directory, policyPollInterval: .seconds(3_600)) { harness in
            #expect(harness.logs.all.contains { $0.contains("cannot open the key-change bell") })
            try await Self.withAdministrator(harness) { administrator in
                let issued = try await administrator.create(.init(name: "Ivy"), policy: nil)
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: issued.key),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                await harness.assembly.keys?.poll()
                #expect(try await harness.chat(Harness.chatBody(), subkey: issued.key).status == 200)
            }
        }
    }

    // MARK: Import

    static let earlierPolicy = """
        {"team_member_alice": {"gpt-4o": {"requests": 3, "total_tokens": 50000}, "*": {"requests": 100}},
         "bob_old_key": {"gpt-4o": {"requests": 0, "total_tokens": 0}},
         "_REVOKED_bob_old_key": {"revoked_at": "2025-05-01T12:00:00+00:00", "reason": "compromised"},
         "carol_key": {"template": "basic", "rules": {"o3": {"requests": 1}}},
         "_templates": {"basic": {"rules": {"*": {"requests": 10}}}}}
        """

    /// A database as the earlier bridge left it: lifetime usage under plaintext keys, names, a replaced key, and a
    /// key only `subkey_names` knows.
    static func earlierDatabase(_ path: String) throws {
        try TestDatabase.execute(path, TestDatabase.earlierUsageTable)
        try TestDatabase.execute(path, TestDatabase.earlierNewerTables)
        try TestDatabase.execute(
            path,
            """
            INSERT INTO usage VALUES ('team_member_alice', 'gpt-4o', 2, 200, 100, 300),
              ('team_member_alice', 'o3', 1, 10, 10, 20), ('bob_old_key', 'gpt-4o', 5, 5, 5, 10),
              ('dave_db_only', 'gpt-4o', 1, 1, 1, 2);
            INSERT INTO subkey_names (subkey, friendly_name, email, description, created_at) VALUES
              ('team_member_alice', 'Alice Smith', 'alice@corp.example', 'FIE team', '2025-03-01 10:00:00'),
              ('dave_db_only', 'Dave', NULL, NULL, '2025-04-01 00:00:00');
            INSERT INTO key_lifecycle (subkey, user_id, status, revoked_at, revoke_reason, replaced_by) VALUES
              ('carol_key', 'carol', 'replaced', '2025-05-01T12:00:00.123456+00:00', 'rotation', 'team_member_alice');
            """
        )
    }

    @Test func importKeepsUsageNamesRulesAndStatesAndLeavesNoPlaintext() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        try Self.earlierDatabase(path)
        let policy = try QuotaPolicy.parse(Array(Self.earlierPolicy.utf8), source: "quotas.json")
        let (administrator, ledger) = try Self.administrator(path)
        let report = try await administrator.importKeys(from: policy, source: "quotas.json", includeDatabaseNames: false)
        #expect(report.imported.map(\.ordinal) == [1, 2, 3])
        #expect(report.revokedMarkers == 1)
        let byOrdinal = Dictionary(
            uniqueKeysWithValues: report.entries.compactMap { entry in entry.ordinal.map { ($0, entry.record) } }
        )
        let alice = try #require(byOrdinal[1])
        #expect(alice.name == "Alice Smith" && alice.email == "alice@corp.example" && alice.description == "FIE team")
        #expect(alice.status == .active && alice.origin == .imported)
        #expect(alice.createdAt == 1_740_823_200)
        #expect(alice.rules == #"{"gpt-4o": {"requests": 3, "total_tokens": 50000}, "*": {"requests": 100}}"#)
        let bob = try #require(byOrdinal[2])
        #expect(bob.status == .revoked && bob.name == "imported-\(bob.id)")
        let carol = try #require(byOrdinal[3])
        #expect(carol.status == .replaced && carol.template == "basic" && carol.revokeReason == "rotation")
        #expect(carol.revokedAt == 1_746_100_800)
        // The usage history moved to the ids, totals unchanged.
        #expect(
            try TestDatabase.usage(path, subkey: alice.id, model: "gpt-4o")
                == Tally(requests: 2, promptTokens: 200, completionTokens: 100, totalTokens: 300)
        )
        #expect(try TestDatabase.usage(path, subkey: alice.id, model: "o3")?.requests == 1)
        #expect(try TestDatabase.usage(path, subkey: bob.id, model: "gpt-4o")?.requests == 5)
        #expect(
            try TestDatabase.count(path, "SELECT count(*) FROM usage WHERE subkey IN ('team_member_alice', 'bob_old_key')") == 0
        )
        // dave is only in subkey_names: left alone without --db-names.
        #expect(try TestDatabase.usage(path, subkey: "dave_db_only", model: "gpt-4o")?.requests == 1)

        // Again, with --db-names: the three stay as they are, dave comes in.
        let again = try await administrator.importKeys(from: policy, source: "quotas.json", includeDatabaseNames: true)
        #expect(again.imported.count == 1 && again.entries.count == 4)
        let dave = try #require(again.imported.first?.record)
        #expect(dave.name == "Dave" && again.imported.first?.ordinal == nil && dave.rules == nil)
        #expect(try TestDatabase.usage(path, subkey: dave.id, model: "gpt-4o")?.requests == 1)
        #expect(
            try await administrator.importKeys(from: policy, source: "quotas.json", includeDatabaseNames: true).imported.isEmpty
        )
        // `quotas check --db` now marks the file's entries as managed, and checks the keys' usage under their ids.
        var inspector = QuotaInspector(policy: policy, source: "quotas.json", now: 0)
        inspector.registry = try await ledger.keyRegistry()
        try TestDatabase.execute(path, "UPDATE usage SET requests = 3 WHERE subkey = ? AND model = 'gpt-4o'", [alice.id])
        inspector.snapshot = try await ledger.snapshot(day: "2026-12-01", month: "2026-12")
        #expect(inspector.check().contains("\(alice.id) Alice Smith  gpt-4o  3 requests"))
        #expect(
            inspector.check().contains("subkey entry #1 \(SubkeyDigest("team_member_alice").keyID)  MANAGED: key \(alice.id)")
        )
        try await ledger.close()
        for plaintext in ["team_member_alice", "bob_old_key", "carol_key", "dave_db_only"] {
            #expect(try !Self.filesContain(plaintext, in: directory), "\(plaintext)")
        }
    }

    @Test func importMovesPeriodsAndTheWholeRequestLogAndCopesWithOlderTables() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        // An older subkey_names (no email, description or times), no key_lifecycle, and one friendly name twice.
        try TestDatabase.execute(path, "CREATE TABLE subkey_names (subkey TEXT PRIMARY KEY, friendly_name TEXT)")
        try TestDatabase.execute(path, "INSERT INTO subkey_names VALUES ('key-one', 'Sam'), ('key-two', 'Sam')")
        try await SQLiteLedger.open(path: path).close()
        let one = SubkeyDigest("key-one").keyID
        try TestDatabase.execute(path, "INSERT INTO usage VALUES ('key-one', 'gpt-4o', 3, 3, 3, 6)")
        try TestDatabase.execute(
            path,
            """
            INSERT INTO usage_period VALUES (?1, 'gpt-4o', 'daily', '2026-11-30', 2, 2, 2, 4),
              (?1, 'gpt-4o', 'monthly', '2026-11', 3, 3, 3, 6)
            """,
            [one]
        )
        // More rows than one batch of the request log's move.
        try TestDatabase.execute(
            path,
            """
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 25001)
            INSERT INTO request_log (finished_at, request_id, key_id, subkey_hash, model, status_code, prompt_tokens,
              completion_tokens, total_tokens, is_streaming, latency_ms, client_disconnected, client_ip, x_forwarded_for)
            SELECT 1764460800 + i, 'r' || i, CASE WHEN i % 2 = 0 THEN ?1 ELSE 'anonymous' END, ?1, 'gpt-4o', 200,
              1, 1, 2, 0, 1.0, 0, '127.0.0.1', '' FROM n
            """,
            [one]
        )
        let policy = try QuotaPolicy.parse(Array(#"{"key-one": {}, "key-two": {}}"#.utf8), source: "quotas.json")
        let (administrator, ledger) = try Self.administrator(path)
        let report = try await administrator.importKeys(from: policy, source: "quotas.json", includeDatabaseNames: false)
        try await ledger.close()
        #expect(report.imported.map(\.record.name) == ["Sam", "Sam (2)"])
        #expect(report.imported.allSatisfy { $0.record.email == nil && $0.record.status == .active })
        let id = try #require(report.imported.first?.record.id)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM usage_period WHERE key_id = ?", [one]) == 0)
        #expect(
            try TestDatabase.count(path, "SELECT sum(requests) FROM usage_period WHERE key_id = ? AND period = 'monthly'", [id])
                == 3
        )
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM request_log WHERE key_id = ?", [id]) == 12_500)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM request_log WHERE key_id = ?", [one]) == 0)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM request_log WHERE key_id = 'anonymous'") == 12_501)
        #expect(try TestDatabase.usage(path, subkey: id, model: "gpt-4o")?.requests == 3)
        #expect(report.movedRows == 1 + 2 + 12_500)
    }

    @Test func anImportWhileTheBridgeRunsKeepsTheAllowanceAndRefusesRetiredSecrets() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let policyPath = directory.appendingPathComponent("quotas.json")
        try Data(Self.earlierPolicy.utf8).write(to: policyPath)
        try await Harness.with(environment: ["QUOTAS_JSON_PATH": policyPath.path], directory: directory) { harness in
            for _ in 0..<2 {
                #expect(try await harness.chat(Harness.chatBody(), subkey: "team_member_alice").status == 200)
            }
            try await Self.withAdministrator(harness) { administrator in
                let policy = try PolicySource.file(policyPath.path).load()
                let report = try await administrator.importKeys(
                    from: policy,
                    source: policyPath.path,
                    includeDatabaseNames: false
                )
                let alice = try #require(report.entries.first { $0.ordinal == 1 }?.record)
                // The same subkey, now a managed key: one request of the three is left.
                #expect(try await harness.chat(Harness.chatBody(), subkey: "team_member_alice").status == 200)
                #expect(await harness.recorder.usage.entries.last?.caller.keyID == alice.id)
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: "team_member_alice"),
                    status: 429,
                    code: "quota_exceeded"
                )
                #expect(try TestDatabase.usage(harness.databasePath, subkey: alice.id, model: "gpt-4o")?.requests == 3)
                #expect(try TestDatabase.usage(harness.databasePath, subkey: "team_member_alice", model: "gpt-4o") == nil)
                #expect(!harness.logs.all.contains { $0.contains("could not move imported keys") })
                // Revoked by its _REVOKED_ entry, still refused; and once rotated away, the old subkey is refused even
                // though the policy file still names it.
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: "bob_old_key"),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                let rotated = try await administrator.rotate(alice.id, grace: 0)
                expectError(
                    try await harness.request(.GET, "/v1/models", subkey: "team_member_alice"),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                #expect(try await harness.request(.GET, "/v1/models", subkey: rotated.key).status == 200)
            }
        }
    }

    // MARK: Commands

    @Test func explainAndReportsKnowManagedKeys() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        let (administrator, ledger) = try Self.administrator(path)
        let policy = try QuotaPolicy.parse(Array(#"{"_global": {"gpt-4o": {"requests": 7}}}"#.utf8), source: "quotas.json")
        let first = try await administrator.create(.init(name: "Hana", email: "hana@example.com"), policy: nil)
        let second = try await administrator.rotate("Hana", grace: 0)
        let registry = try await ledger.keyRegistry()
        try await ledger.close()
        var inspector = QuotaInspector(policy: policy, source: "quotas.json", now: Date().timeIntervalSince1970)
        inspector.registry = registry
        let current = inspector.explain(subkey: second.key, model: "gpt-4o")
        #expect(current.authorised && current.text.contains("managed key \(first.record.id) Hana <hana@example.com>"))
        #expect(current.text.contains("in force: requests 7"))
        let retired = inspector.explain(subkey: first.key, model: "gpt-4o")
        #expect(!retired.authorised && retired.text.contains("rotated away"))
        let names = UsageCommand.Report.names(directory: KeyDirectory(), registry: registry, environment: [:])
        #expect(names[first.record.id] == "Hana <hana@example.com>")
    }

    @Test func commandsExitWithTheirStatus() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = directory.appendingPathComponent("quota.db").path
        func run(_ arguments: [String]) async throws {
            var command =
                try OAIToCircuitCommand.parseAsRoot(["keys"] + arguments + ["--db", database]) as! any AsyncParsableCommand
            try await command.run()
        }
        await #expect(throws: ExitCode.failure) { try await run(["list"]) }
        // A database is made only when asked: a key in a database the bridge never reads would not work.
        await #expect(throws: ExitCode.failure) { try await run(["create", "--name", "Gina"]) }
        #expect(!FileManager.default.fileExists(atPath: database))
        try await run(["create", "--name", "Gina", "--email", "gina@example.com", "--create-db"])
        await #expect(throws: ExitCode.validationFailure) { try await run(["create", "--name", "H", "--email", "nope"]) }
        await #expect(throws: ExitCode.validationFailure) { try await run(["create", "--name", "H", "--rules", "[]"]) }
        await #expect(throws: ExitCode.validationFailure) { try await run(["create", "--name", "H", "--prefix", "a b"]) }
        let gina = try #require(try TestDatabase.rows(database, "SELECT id FROM managed_key").first?["id"] as String?)
        await #expect(throws: ExitCode.failure) { try await run(["create", "--name", gina]) }
        try await run(["create", "--name", "abcdefghijk2"])
        await #expect(throws: ExitCode.validationFailure) { try await run(["rotate", "Gina", "--grace", "1e13"]) }
        await #expect(throws: ExitCode(78)) { try await run(["create", "--name", "H", "--template", "gold"]) }
        await #expect(throws: ExitCode.failure) { try await run(["create", "--name", "gina"]) }
        try await run(["list", "--json"])
        try await run(["show", "Gina"])
        await #expect(throws: ExitCode.failure) { try await run(["show", "nobody"]) }
        await #expect(throws: ValidationError.self) { try await run(["rotate", "Gina", "--grace", "soon"]) }
        try await run(["rotate", "Gina", "--grace", "1h"])
        try await run(["update", "Gina", "--email", "", "--rules", #"{"gpt-4o": {"requests": 1}}"#])
        // Every change rings the bell a running bridge reads; reading does not.
        let bell = try #require(KeyChangeBell(databasePath: database, create: false))
        let rung = bell.value
        #expect(rung == 4)  // two creates, rotate, update
        try await run(["list"])
        #expect(bell.value == rung)
        try await run(["revoke", "Gina", "--reason", "test"])
        #expect(bell.value == rung + 1)
        await #expect(throws: ExitCode.failure) { try await run(["revoke", "Gina", "--reason", "again"]) }
        await #expect(throws: ExitCode(78)) {
            try await run(["import", "--from-quotas", directory.appendingPathComponent("none.json").path])
        }
        let key = try #require(try TestDatabase.rows(database, "SELECT * FROM managed_key WHERE id = ?", [gina]).first)
        #expect(key["status"] == "revoked" && key["email"] as String? == nil)
        #expect(key["rules"] == #"{"gpt-4o": {"requests": 1}}"#)
        #expect(
            try TestDatabase.rows(database, "SELECT action FROM managed_key_history WHERE key_id = ? ORDER BY id", [gina])
                .map { $0["action"] as String } == ["created", "rotated", "updated", "revoked"]
        )
    }
}
