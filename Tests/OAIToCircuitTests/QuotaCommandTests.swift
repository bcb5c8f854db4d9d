import ArgumentParser
import Foundation
import Testing

@testable import OAIToCircuit

/// `quotas check`, `quotas explain` and `usage report`.
@Suite(.timeLimit(.minutes(1))) struct QuotaCommandTests {
    static let policy = #"""
        {"_global": {"claude-3-opus": {"requests": 0}},
         "team_member_alice": {"gpt-4o": {"requests": 100, "pricing_tier": "payg"}, "*": {"total_tokens": 500000, "period": "monthly"}},
         "bob": {"*": {"requests": 10}},
         "_REVOKED_carol": {}}
        """#

    func parse(_ text: String = Self.policy) throws -> QuotaPolicy {
        try QuotaPolicy.parse(Array(text.utf8), source: "quotas.json")
    }

    /// A database in the earlier bridge's shape, plus this bridge's tables.
    func database(in directory: URL) async throws -> String {
        let path = directory.appendingPathComponent("quota.db").path
        try TestDatabase.execute(path, TestDatabase.earlierUsageTable + ";" + TestDatabase.earlierNewerTables)
        try TestDatabase.execute(
            path,
            """
            INSERT INTO usage VALUES ('team_member_alice', 'gpt-4o', 120, 1000, 2000, 3000),
              ('bob', 'o3', 12, 10, 20, 30), ('gone', 'o3', 1, 1, 1, 2);
            INSERT INTO subkey_names (subkey, friendly_name, email) VALUES ('team_member_alice', 'Alice', 'alice@example.com'),
              ('mallory', 'Mallory', NULL);
            """
        )
        let store = try SQLiteLedger.open(path: path)
        try await store.close()
        return path
    }

    @Test func checkPrintsEachSubkeysRulesWithoutItsKey() throws {
        let text = QuotaInspector(policy: try parse(), source: "quotas.json", now: 0).check()
        #expect(text.hasPrefix("quotas.json: valid; 2 subkeys, 0 templates\n"))
        #expect(text.contains("warning: ignored fields this bridge does not use: pricing_tier"))
        #expect(text.contains("subkey entry #1 \(Caller.hash("team_member_alice"))"))
        #expect(text.contains("subkey entry #2 \(Caller.hash("bob"))"))
        #expect(text.contains("  claude-3-opus   blocked             -  -        _global"))
        #expect(text.contains("  gpt-4o              100             -  -        own"))
        #expect(text.contains("  *                     -        500000  monthly  own"))
        for secret in ["team_member_alice", "bob", "carol"] { #expect(!text.contains(secret)) }
    }

    @Test func checkWithTheDatabaseListsKeysAlreadyAtALimit() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = try await database(in: directory)
        let store = try SQLiteLedger.open(path: path, readOnly: true)
        let inspector = QuotaInspector(
            policy: try parse(),
            source: "quotas.json",
            directory: try await store.directory(),
            snapshot: try await store.snapshot(day: "2026-11-29", month: "2026-11"),
            ledgerKeys: try await store.ledgerKeys(),
            now: 0
        )
        try await store.close()
        let text = inspector.check()
        #expect(text.contains("subkey entry #1 \(Caller.hash("team_member_alice")) Alice <alice@example.com>"))
        #expect(text.contains("At or over a limit now"))
        // Alice's 120 requests are lifetime totals, but her gpt-4o limit is monthly (the period comes from `*`), so
        // only Bob is listed.
        let listed = text.components(separatedBy: "At or over a limit now").last?.split(separator: "\n") ?? []
        #expect(
            listed.dropFirst().prefix(2).map(String.init) == [
                "  subkey                      model  limit        used  period",
                "  #2 \(Caller.hash("bob"))  o3     10 requests    12  lifetime",
            ]
        )
        #expect(text.contains("1 key in subkey_names or key_lifecycle but not in this policy: refused now"))
        #expect(text.contains("1 key with usage in the ledger but not in this policy"))
    }

    @Test func explainSaysWhichRuleAppliesAndWhatIsLeft() async throws {
        let policy = try parse()
        let now = 1_795_945_845.0  // 2026-11-29T09:50:45Z
        var snapshot = LedgerSnapshot()
        snapshot.lifetime = [.init(key: "team_member_alice", model: "gpt-4o", tally: Tally(requests: 40, totalTokens: 400))]
        snapshot.monthly = [
            .init(key: Caller.hash("team_member_alice"), model: "gpt-4o", tally: Tally(requests: 4, totalTokens: 123))
        ]
        let inspector = QuotaInspector(policy: policy, source: "quotas.json", snapshot: snapshot, now: now)

        let (text, authorised) = inspector.explain(subkey: "team_member_alice", model: "gpt-4o")
        #expect(authorised)
        #expect(text.contains("  gpt-4o  requests=100                        own"))
        #expect(text.contains("  *       total_tokens=500000 period=monthly  own"))
        #expect(text.contains("in force: requests 100, total_tokens 500000, period monthly"))
        #expect(text.contains("used this month (2026-11): 4 requests, 123 tokens"))
        #expect(text.contains("left: 96 requests, 499877 tokens; starts again at 2026-12-01T00:00:00Z"))
        #expect(text.hasSuffix("admitted now\n"))

        #expect(
            inspector.explain(subkey: "team_member_alice", model: "claude-3-opus").text.contains(
                "refused (403 model_not_allowed)"
            )
        )
        let stranger = inspector.explain(subkey: "stranger", model: "gpt-4o")
        #expect(!stranger.authorised && stranger.text.contains("refused (403 unauthorized_subkey)"))
        #expect(!stranger.text.contains("stranger"))
        var bob = snapshot
        bob.lifetime = [.init(key: "bob", model: "o3", tally: Tally(requests: 10))]
        let used = QuotaInspector(policy: policy, source: "quotas.json", snapshot: bob, now: now)
        #expect(used.explain(subkey: "bob", model: "o3").text.hasSuffix("refused now (429 quota_exceeded, requests)\n"))
    }

    @Test func checkExitsWithTheConfigurationStatusOnABadFile() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let good = directory.appendingPathComponent("good.json")
        let bad = directory.appendingPathComponent("bad.json")
        try Data(Self.policy.utf8).write(to: good)
        try Data(#"{"k": {"*": {"requests": []}}}"#.utf8).write(to: bad)
        var command = try OAIToCircuitCommand.parseAsRoot(["quotas", "check", good.path]) as! any AsyncParsableCommand
        try await command.run()
        command = try OAIToCircuitCommand.parseAsRoot(["quotas", "check", bad.path]) as! any AsyncParsableCommand
        await #expect(throws: ExitCode(78)) { try await command.run() }
        command =
            try OAIToCircuitCommand.parseAsRoot(["quotas", "check", directory.appendingPathComponent("none").path])
            as! any AsyncParsableCommand
        await #expect(throws: ExitCode(78)) { try await command.run() }
        let database = try await self.database(in: directory)
        command =
            try OAIToCircuitCommand.parseAsRoot(
                ["quotas", "explain", "--subkey", "nobody", "--model", "o3", good.path, "--db", database]
            ) as! any AsyncParsableCommand
        await #expect(throws: ExitCode.failure) { try await command.run() }
        command =
            try OAIToCircuitCommand.parseAsRoot(
                ["usage", "report", "--db", database, "--since", "2026-11", "--by", "model", "--format", "csv"]
            ) as! any AsyncParsableCommand
        try await command.run()
        for bad in [["--by", "week"], ["--format", "xml"], ["--since", "yesterday"], ["--until", "2026-13"]] {
            command =
                try OAIToCircuitCommand.parseAsRoot(["usage", "report", "--db", database] + bad) as! any AsyncParsableCommand
            await #expect(throws: ValidationError.self) { try await command.run() }
        }
    }

    @Test func usageReportGroupsAndFormats() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = try await database(in: directory)
        let store = try SQLiteLedger.open(path: path)
        var entries: [LedgerEntry] = []
        for (model, day) in [("gpt-4o", "2026-11-28"), ("gpt-4o", "2026-11-29"), ("o3", "2026-11-29"), ("o3", "2026-12-01")] {
            var entry = LedgerTests.entry(model: model)
            entry.ledgerKey = "bob"
            entry.keyID = Caller.hash("bob")
            entry.day = day
            entry.month = String(day.prefix(7))
            entries.append(entry)
        }
        _ = try await store.commit(entries, events: [], purgingLogBefore: nil, purgeLimit: 0)

        // Lifetime, by subkey: the earlier bridge's history included, names where known, never a plaintext key.
        let lifetime = UsageReport(
            rows: try await store.report(UsageQuery(grouping: .subkey)),
            grouping: .subkey,
            names: [Caller.hash("team_member_alice"): "Alice <alice@example.com>"]
        )
        let table = lifetime.render(.table)
        let lines = table.split(separator: "\n")
        #expect(
            lines.first
                == "key_id                   name                       requests  prompt_tokens  completion_tokens  total_tokens"
        )
        #expect(
            lines[1]
                == "\(Caller.hash("team_member_alice"))  Alice <alice@example.com>       120           1000               2000          3000"
        )
        #expect(
            lines.last
                == "TOTAL                                                    137           1015               2029          3044"
        )
        #expect(!table.contains("team_member_alice") && !table.contains("bob"))

        // Days, limited to a range, as CSV.
        let days = UsageReport(
            rows: try await store.report(
                UsageQuery(
                    since: PeriodCalendar.day(parsing: "2026-11-29"),
                    until: PeriodCalendar.day(parsing: "2026-11-30"),
                    grouping: .day
                )
            ),
            grouping: .day
        )
        #expect(days.render(.csv) == "day,requests,prompt_tokens,completion_tokens,total_tokens\n2026-11-29,2,2,4,6\n")

        // Months, for one model, as JSON.
        let months = UsageReport(rows: try await store.report(UsageQuery(model: "o3", grouping: .month)), grouping: .month)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(months.render(.json).utf8)) as? [[String: Any]])
        #expect(json.map { $0["month"] as? String } == ["2026-11", "2026-12"])
        #expect(json.map { $0["requests"] as? Int } == [1, 1])

        // One key by its hashed id, by model.
        let bob = UsageReport(
            rows: try await store.report(UsageQuery(keyIDs: [Caller.hash("bob")], grouping: .model)),
            grouping: .model
        )
        #expect(bob.lines.map(\.group) == ["o3", "gpt-4o"])
        #expect(bob.lines.map(\.tally.requests) == [14, 2])
        try await store.close()
    }

    @Test func anEarlierBridgesFileNotYetMigratedShowsItsMonthlyTotals() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        try TestDatabase.execute(path, TestDatabase.earlierUsageTable + ";" + TestDatabase.earlierNewerTables)
        try TestDatabase.execute(
            path,
            """
            INSERT INTO usage VALUES ('bob', 'o3', 30, 0, 0, 0);
            INSERT INTO monthly_usage VALUES ('bob', 'o3', '2026-10', 18, 0, 0, 0), ('bob', 'o3', '2026-11', 12, 0, 0, 0);
            """
        )
        let store = try SQLiteLedger.open(path: path, readOnly: true)
        let snapshot = try await store.snapshot(day: "2026-11-29", month: "2026-11")
        #expect(snapshot.monthly.map(\.tally.requests) == [12] && snapshot.monthly.first?.key == Caller.hash("bob"))
        let months = try await store.report(UsageQuery(grouping: .month))
        #expect(UsageReport(rows: months, grouping: .month).lines.map(\.group) == ["2026-10", "2026-11"])
        try await store.close()
        // Read-only: nothing was migrated.
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM sqlite_master WHERE name = 'usage_period'") == 0)
    }

    @Test func csvFieldsAreQuotedAndNeverFormulas() {
        #expect(UsageReport.csvField("plain") == "plain")
        #expect(UsageReport.csvField("a,b") == "\"a,b\"")
        #expect(UsageReport.csvField("say \"hi\"") == "\"say \"\"hi\"\"\"")
        #expect(UsageReport.csvField("=cmd()") == "'=cmd()")
    }
}
