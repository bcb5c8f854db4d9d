import AsyncHTTPClient
import CircuitFakes
import Foundation
import GRDB
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Testing

@testable import OAIToCircuit

/// Section 5.3: the ledger's rows, its durability, the earlier bridge's files used in place, group commit, and a
/// failing database.
@Suite(.timeLimit(.minutes(1))) struct LedgerTests {
    @Test func everyAnswerIsInTheLedgerBeforeTheClientHasItsLastByte() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.chat(
                Harness.chatBody(),
                headers: [("X-Request-ID", "req-1"), ("X-Forwarded-For", "203.0.113.9, 10.0.0.1")]
            )
            #expect(answer.status == 200)
            // Read at once, from another connection: the commit happened before the answer ended.
            #expect(
                try TestDatabase.usage(harness.databasePath, subkey: Harness.subkey, model: "gpt-4o")
                    == Tally(requests: 1, promptTokens: 11, completionTokens: 7, totalTokens: 18)
            )
            let row = try #require(try TestDatabase.rows(harness.databasePath, "SELECT * FROM request_log").first)
            #expect(row["request_id"] as String == "req-1")
            #expect(row["key_id"] as String == Caller.hash(Harness.subkey))
            #expect(row["subkey_hash"] as String == Caller.hash(Harness.subkey))
            #expect(row["model"] as String == "gpt-4o")
            #expect(row["status_code"] as Int == 200)
            #expect(row["prompt_tokens"] as Int == 11 && row["completion_tokens"] as Int == 7 && row["total_tokens"] as Int == 18)
            #expect(row["is_streaming"] as Bool == false && row["client_disconnected"] as Bool == false)
            #expect(row["client_ip"] as String == "127.0.0.1")
            #expect(row["x_forwarded_for"] as String == "203.0.113.9, 10.0.0.1")
            #expect((row["latency_ms"] as Double) > 0)
            #expect(abs((row["finished_at"] as Double) - harness.bridge.clock.now()) < 1)
            // Outside the usage table, the plaintext key appears nowhere.
            let tables = try TestDatabase.rows(harness.databasePath, "SELECT name FROM sqlite_master WHERE type = 'table'")
                .map { $0["name"] as String }
            #expect(Set(tables).isSuperset(of: ["usage", "usage_period", "request_log"]))
            for table in tables where table != "usage" {
                for row in try TestDatabase.rows(harness.databasePath, "SELECT * FROM \(table)") {
                    for column in row.columnNames {
                        let text = String(describing: row[column] as DatabaseValue)
                        #expect(!text.contains(Harness.subkey), "\(table).\(column)")
                    }
                }
            }
        }
    }

    @Test func streamedAndDisconnectedRequestsHaveTheirRows() async throws {
        var settings = FakeCircuit.Settings()
        settings.headerDelay = .milliseconds(600)
        try await Harness.with(circuitSettings: settings) { harness async throws in
            #expect(try await harness.chat(Harness.chatBody(stream: true)).status == 200)
            let request = harness.chatRequest(Harness.chatBody(model: "slow-headers", stream: true))
            // The client gives up once Circuit has the request (an event, not a fixed time), before Circuit answers.
            let client = Task { try await harness.client.execute(request, timeout: .seconds(30)) }
            await harness.circuit.requests.wait { $0.contains { $0.path.contains("slow-headers") } }
            client.cancel()
            await #expect(throws: (any Error).self) { _ = try await client.value }
            await harness.recorder.usage.wait(until: { $0.count == 2 })
            let rows = try TestDatabase.rows(
                harness.databasePath,
                "SELECT model, is_streaming, client_disconnected, total_tokens FROM request_log ORDER BY id"
            )
            #expect(rows.map { $0["model"] as String } == ["gpt-4o", "slow-headers"])
            #expect(rows.map { $0["is_streaming"] as Bool } == [true, true])
            #expect(rows.map { $0["client_disconnected"] as Bool } == [false, true])
            #expect(rows.first?["total_tokens"] as Int? == 15)
            #expect(try TestDatabase.usage(harness.databasePath, subkey: Harness.subkey, model: "slow-headers")?.requests == 1)
        }
    }

    @Test func anEarlierBridgesDatabaseHoldingOnlyUsageIsUsedInPlace() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        try TestDatabase.execute(path, TestDatabase.earlierUsageTable)
        try TestDatabase.execute(
            path,
            "INSERT INTO usage VALUES ('team_member_alice', 'gpt-4o', 9, 900, 90, 990), ('bob', 'o3', 3, 1, 2, 3)"
        )
        let environment = [
            "QUOTA_DB_PATH": path, "QUOTAS_JSON": #"{"team_member_alice": {"gpt-4o": {"requests": 10}}, "bob": {}}"#,
        ]
        try await Harness.with(environment: environment, directory: directory) { harness async throws in
            // Nine of ten used before the upgrade: one left.
            #expect(try await harness.chat(Harness.chatBody(), subkey: "team_member_alice").status == 200)
            expectError(
                try await harness.chat(Harness.chatBody(), subkey: "team_member_alice"),
                status: 429,
                code: "quota_exceeded"
            )
            #expect(
                try TestDatabase.usage(path, subkey: "team_member_alice", model: "gpt-4o")
                    == Tally(requests: 10, promptTokens: 911, completionTokens: 97, totalTokens: 1008)
            )
            #expect(try TestDatabase.usage(path, subkey: "bob", model: "o3")?.requests == 3)
        }
        // The table is still the earlier bridge's, so it could still read the file.
        let columns = try TestDatabase.rows(path, "PRAGMA table_info(usage)").map { $0["name"] as String }
        #expect(columns == ["subkey", "model", "requests", "prompt_tokens", "completion_tokens", "total_tokens"])
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM grdb_migrations") == 5)
    }

    /// The earlier bridge never enforced key_lifecycle's foreign keys: a dangling `replaced_by` must not stop this one.
    @Test func anEarlierBridgesNewerTablesGiveMonthlyCountsNamesAndRevocations() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        let month = PeriodCalendar.monthString(PeriodCalendar.month(ofDay: PeriodCalendar.day(Date().timeIntervalSince1970)))
        try TestDatabase.execute(path, TestDatabase.earlierUsageTable + ";" + TestDatabase.earlierNewerTables)
        try TestDatabase.execute(
            path,
            """
            INSERT INTO usage VALUES ('alice', 'gpt-4o', 40, 0, 0, 400);
            INSERT INTO monthly_usage VALUES ('alice', 'gpt-4o', '2020-01', 35, 0, 0, 350), ('alice', 'gpt-4o', ?, 5, 0, 0, 50);
            INSERT INTO subkey_names (subkey, friendly_name, email) VALUES ('alice', 'Alice Liddell', 'alice@example.com'),
              ('mallory', 'Mallory', NULL);
            INSERT INTO key_lifecycle (subkey, status, replaced_by) VALUES ('old-key', 'revoked', NULL),
              ('older-key', 'replaced', 'a-key-that-was-never-written'), ('alice', 'active', NULL);
            """,
            [month]
        )
        let policy = #"{"alice": {"gpt-4o": {"requests": 6, "period": "monthly"}}, "old-key": {}, "older-key": {}}"#
        try await Harness.with(environment: ["QUOTA_DB_PATH": path, "QUOTAS_JSON": policy], directory: directory) {
            harness async throws in
            // Five this month already: one left.
            #expect(try await harness.chat(Harness.chatBody(), subkey: "alice").status == 200)
            expectError(try await harness.chat(Harness.chatBody(), subkey: "alice"), status: 429, code: "quota_exceeded")
            // Revoked and replaced keys stay refused even though the policy names them.
            for key in ["old-key", "older-key"] {
                expectError(try await harness.chat(Harness.chatBody(), subkey: key), status: 403, code: "unauthorized_subkey")
            }
            // subkey_names alone does not authorise.
            expectError(try await harness.chat(Harness.chatBody(), subkey: "mallory"), status: 403, code: "unauthorized_subkey")
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.caller.friendlyName == "Alice Liddell" && record.caller.email == "alice@example.com")
            let row = try #require(try TestDatabase.rows(path, "SELECT friendly_name, email FROM request_log").first)
            #expect(row["friendly_name"] as String? == "Alice Liddell" && row["email"] as String? == "alice@example.com")
            // The monthly rows were carried over under the hashed key; the earlier table is left as it was.
            let months = try TestDatabase.rows(
                path,
                "SELECT period_start, requests FROM usage_period WHERE period = 'monthly' AND key_id = ? ORDER BY period_start",
                [Caller.hash("alice")]
            )
            #expect(months.map { $0["requests"] as Int } == [35, 6])
            #expect(try TestDatabase.count(path, "SELECT sum(requests) FROM monthly_usage") == 40)
        }
    }

    @Test func concurrentRecordsShareTransactions() async throws {
        let store = GatedStore()
        let writer = LedgerWriter(store: store, retentionDays: 90, clock: .system, logger: Logger(label: "test"), metrics: nil)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await writer.commit(Self.entry(model: "first")) }
            await store.started.wait(until: { $0.count == 1 })
            for index in 0..<19 {
                group.addTask { await writer.commit(Self.entry(model: "m\(index)")) }
            }
            while writer.queued < 19 { await Task.yield() }
            store.open()
            try await group.waitForAll()
        }
        // One transaction for the first record, one for the nineteen that waited meanwhile.
        #expect(await store.started.entries == [1, 19])
        #expect(writer.health.isHealthy && writer.queued == 0)
    }

    @Test func aFailingDatabaseKeepsRecordsAnswersClientsAndShowsInHealth() async throws {
        try await Harness.with { harness async throws in
            // Another process breaks the schema under the bridge.
            try TestDatabase.execute(harness.databasePath, "ALTER TABLE request_log RENAME TO request_log_away")
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
            let health = try await harness.request(.GET, "/health")
            #expect(health.status == 503 && health.json?["status"] as? String == "unhealthy")
            let database = try #require(health.json?["database"] as? [String: Any])
            #expect(database["status"] as? String == "error")
            #expect((database["last_error"] as? String)?.contains("request_log") == true)
            #expect(database["unwritten_records"] as? Int == 2)
            #expect(harness.logs.all.contains { $0.contains("ledger commit failed") })
            // Repaired: without any request (a load balancer stops sending them on 503), the writer tries again
            // every second and writes what was kept.
            try TestDatabase.execute(harness.databasePath, "ALTER TABLE request_log_away RENAME TO request_log")
            var healthy = try await harness.request(.GET, "/health")
            for _ in 0..<100 where healthy.status != 200 {
                try await Task.sleep(for: .milliseconds(50))
                healthy = try await harness.request(.GET, "/health")
            }
            #expect(healthy.status == 200 && (healthy.json?["database"] as? [String: Any])?["status"] as? String == "ok")
            #expect(try TestDatabase.count(harness.databasePath, "SELECT count(*) FROM request_log") == 2)
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
            #expect(try TestDatabase.usage(harness.databasePath, subkey: Harness.subkey, model: "gpt-4o")?.requests == 3)
        }
    }

    @Test func oldRequestLogRowsArePurged() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        let store = try SQLiteLedger.open(path: path)
        let now = Date().timeIntervalSince1970
        var old = Self.entry(model: "gpt-4o")
        old.finishedAt = now - 91 * 86_400
        var recent = Self.entry(model: "gpt-4o")
        recent.finishedAt = now - 89 * 86_400
        let event = OutboxEvent(kind: .usage, time: now, body: Array(#"{"x":1}"#.utf8))
        _ = try await store.commit([old, old, recent], events: [event, event], purgingLogBefore: nil, purgeLimit: 10)
        // Events Splunk refused go with the log rows of their age.
        let pending = try await store.pendingEvents(after: 0, limit: 10)
        try await store.deadLetter(pending[0], answer: "old", at: now - 91 * 86_400)
        try await store.deadLetter(pending[1], answer: "recent", at: now - 89 * 86_400)
        let purged = try await store.commit([], events: [], purgingLogBefore: now - 90 * 86_400, purgeLimit: 10)
        #expect(purged == 2)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM request_log") == 1)
        #expect(try TestDatabase.rows(path, "SELECT answer FROM splunk_dead_letter").map { $0["answer"] as String } == ["recent"])
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM splunk_outbox") == 0)
        // Totals are never purged.
        #expect(try TestDatabase.usage(path, subkey: "k", model: "gpt-4o")?.requests == 3)
        try await store.close()
    }

    /// The commit binds values through SQLite's C interface: every kind of value must land as GRDB would have
    /// stored it, and a statement failing half-way must leave nothing of its transaction behind.
    @Test func valuesLandExactlyAndAFailedTransactionLeavesNothing() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        let store = try SQLiteLedger.open(path: path)
        var entry = Self.entry(model: "modèle-🚀")
        entry.ledgerKey = "clé-après"
        entry.friendlyName = "Zoë O'Brien"
        entry.email = nil
        entry.forwardedFor = ""
        entry.usage = Usage(promptTokens: Int.max, completionTokens: 0)
        let body: [UInt8] = [0, 255, 34, 10]
        let events = [OutboxEvent(kind: .error, time: 1.5, body: body), OutboxEvent(kind: .usage, time: 2, body: [])]
        _ = try await store.commit([entry, entry], events: events, purgingLogBefore: nil, purgeLimit: 0)

        let usage = try #require(try TestDatabase.rows(path, "SELECT *, typeof(requests) AS type FROM usage").first)
        #expect(usage["subkey"] as String == "clé-après" && usage["model"] as String == "modèle-🚀")
        #expect(usage["requests"] as Int64 == 2 && usage["type"] as String == "integer")
        // Two requests of Int.max prompt tokens: the sum saturates instead of turning into a REAL.
        #expect(usage["prompt_tokens"] as Int64 == Int64.max)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM usage_period WHERE requests = 2") == 2)
        let logged = try TestDatabase.rows(
            path,
            """
            SELECT friendly_name, email, x_forwarded_for, typeof(x_forwarded_for) AS xff, typeof(finished_at) AS time,
              is_streaming, typeof(latency_ms) AS latency FROM request_log
            """
        )
        #expect(logged.count == 2)
        for row in logged {
            #expect(row["friendly_name"] as String == "Zoë O'Brien" && row["email"] as String? == nil)
            #expect(row["x_forwarded_for"] as String == "" && row["xff"] as String == "text")
            #expect(row["time"] as String == "real" && row["latency"] as String == "real" && row["is_streaming"] as Int == 0)
        }
        let outbox = try TestDatabase.rows(
            path,
            "SELECT id, kind, time, event, typeof(event) AS type FROM splunk_outbox ORDER BY id"
        )
        #expect(outbox.map { $0["kind"] as String } == ["error", "usage"])
        #expect(outbox.map { $0["type"] as String } == ["blob", "blob"])
        #expect((outbox[0]["event"] as Data) == Data(body) && (outbox[1]["event"] as Data).isEmpty)
        #expect(outbox[0]["time"] as Double == 1.5 && outbox[1]["id"] as Int64 == (outbox[0]["id"] as Int64) + 1)

        // The request log's insert fails after the usage upserts and the outbox insert ran: all of it is undone.
        try TestDatabase.execute(path, "ALTER TABLE request_log RENAME TO request_log_away")
        await #expect(throws: DatabaseError.self) {
            _ = try await store.commit([entry], events: events, purgingLogBefore: nil, purgeLimit: 0)
        }
        #expect(try TestDatabase.usage(path, subkey: "clé-après", model: "modèle-🚀")?.requests == 2)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM splunk_outbox") == 2)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM usage_period WHERE requests = 2") == 2)
        // And the connection is usable again once the table is back.
        try TestDatabase.execute(path, "ALTER TABLE request_log_away RENAME TO request_log")
        _ = try await store.commit([entry], events: [], purgingLogBefore: nil, purgeLimit: 0)
        #expect(try TestDatabase.usage(path, subkey: "clé-après", model: "modèle-🚀")?.requests == 3)
        try await store.close()
    }

    /// Under commits back to back (a busy bridge), a checkpoint beside the writer never lets the WAL start again;
    /// the bound does. Run once without it, to show the test can tell.
    @Test(arguments: [false, true]) func theWALStaysBoundedUnderUnbrokenLoad(bounded: Bool) async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        let store = try SQLiteLedger.open(path: path, readOnly: false, walFrameLimit: bounded ? 1024 : .max)
        var largest = 0
        for index in 0..<3000 {
            var entry = Self.entry(model: "m\(index % 50)")
            entry.ledgerKey = "key-\(index % 40)"
            _ = try await store.commit([entry], events: [], purgingLogBefore: nil, purgeLimit: 0)
            if index % 100 == 99 {
                let attributes = try? FileManager.default.attributesOfItem(atPath: path + "-wal")
                largest = max(largest, attributes?[.size] as? Int ?? 0)
            }
        }
        try await store.close()
        // 1024 frames is 4 MiB: one more cycle of checkpoints at most beyond it.
        if bounded {
            #expect(largest < 12 << 20, "largest WAL \(largest) bytes")
        } else {
            #expect(largest > 12 << 20, "largest WAL \(largest) bytes")
        }
    }

    static func entry(model: String) -> LedgerEntry {
        let caller = Caller(subkey: "k")
        let record = UsageRecord(
            requestID: UUID().uuidString,
            finishedAt: Date().timeIntervalSince1970,
            admission: Admission(caller: caller, model: model, admittedAt: Date().timeIntervalSince1970),
            statusCode: 200,
            usage: Usage(promptTokens: 1, completionTokens: 2),
            isStreaming: false,
            latency: .milliseconds(5),
            clientDisconnected: false,
            clientAddress: "127.0.0.1",
            forwardedFor: ""
        )
        return LedgerEntry(record)
    }
}

extension LedgerTests {
    /// While the database fails, kept records are bounded; refusals' events go first, so that a flood of refused
    /// requests cannot push out the usage quotas count.
    @Test func aFailingDatabaseDropsRefusalEventsBeforeUsage() async throws {
        let spool = SplunkSpool(maximumEvents: 1_000, batchSize: 500)
        let writer = LedgerWriter(
            store: FailingStore(),
            retentionDays: 90,
            clock: .system,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }),
            metrics: nil,
            spool: spool,
            maximumUnwritten: 4
        )
        let refusal = OutboxEvent(kind: .error, time: 0, body: Array(#"{"event_type":"error"}"#.utf8))
        for _ in 0..<3 { await writer.commit(event: refusal) }
        for index in 0..<3 { await writer.commit(Self.entry(model: "m\(index)")) }
        for _ in 0..<2 { await writer.commit(event: refusal) }
        let health = writer.health
        #expect(!health.isHealthy && health.unwritten == 3 && health.droppedRecords == 0)
        #expect(spool.counts.pendingErrors == 1 && spool.counts.droppedErrors == 4)
    }
}

/// A store that only commits (and keeps nothing to read): a test's own store says how.
protocol CommitOnlyStore: LedgerStore {}

extension CommitOnlyStore {
    func snapshot(day: String, month: String) async throws -> LedgerSnapshot { LedgerSnapshot() }
    func directory() async throws -> KeyDirectory { KeyDirectory() }
    func report(_ query: UsageQuery) async throws -> [UsageReportRow] { [] }
    func close() async throws {}
    func pendingEvents(after id: Int64, limit: Int) async throws -> [PendingEvent] { [] }
    func delivered(_ ids: ClosedRange<Int64>) async throws {}
    func settled(through id: Int64) async throws {}
    func deadLetter(_ event: PendingEvent, answer: String, at time: Double) async throws {}
    func outboxCounts() async throws -> OutboxCounts { OutboxCounts() }
}

/// A store whose every transaction fails.
final class FailingStore: CommitOnlyStore {
    struct Broken: Error {}
    var location: String { "broken" }
    func commit(
        _ entries: [LedgerEntry],
        events: [OutboxEvent],
        purgingLogBefore cutoff: Double?,
        purgeLimit: Int
    ) async throws -> Int { throw Broken() }
}

/// A store whose first transaction waits until the test opens it, recording each transaction's size.
final class GatedStore: CommitOnlyStore {
    let started = Journal<Int>()
    private let gate = NIOLockedValueBox<CheckedContinuation<Void, Never>?>(nil)
    private let isOpen = NIOLockedValueBox(false)

    var location: String { "memory" }

    func open() {
        let waiting = isOpen.withLockedValue { open -> CheckedContinuation<Void, Never>? in
            open = true
            return gate.withLockedValue { gate in
                defer { gate = nil }
                return gate
            }
        }
        waiting?.resume()
    }

    func commit(
        _ entries: [LedgerEntry],
        events: [OutboxEvent],
        purgingLogBefore cutoff: Double?,
        purgeLimit: Int
    ) async throws -> Int {
        await started.append(entries.count)
        await withCheckedContinuation { continuation in
            let proceed = isOpen.withLockedValue { open in
                if !open { gate.withLockedValue { $0 = continuation } }
                return open
            }
            if proceed { continuation.resume() }
        }
        return 0
    }
}

extension LedgerTests {
    /// A usage event is its request-log row, marked for Splunk: the shipper reads marked rows and the outbox's events
    /// as one queue in commit order, and the log's cursor says how far Splunk has them.
    @Test func usageEventsAreReadFromTheRequestLogWithTheOutboxInCommitOrder() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        var store = try SQLiteLedger.open(path: path)
        let old = Date().timeIntervalSince1970 - 100 * 86_400
        var first = Self.entry(model: "gpt-4o")
        first.hasUsageEvent = true
        first.finishedAt = old
        // Delivery off, or the spool full: no event.
        var unmarked = Self.entry(model: "gpt-4o")
        unmarked.finishedAt = old
        var last = Self.entry(model: "o3")
        last.hasUsageEvent = true
        last.finishedAt = old
        let refusal = OutboxEvent(kind: .error, time: old, body: Array(#"{"event_type":"error"}"#.utf8))
        _ = try await store.commit([first], events: [refusal], purgingLogBefore: nil, purgeLimit: 0)
        _ = try await store.commit([unmarked], events: [], purgingLogBefore: nil, purgeLimit: 0)
        _ = try await store.commit([last], events: [], purgingLogBefore: nil, purgeLimit: 0)

        let pending = try await store.pendingEvents(after: 0, limit: 10)
        #expect(pending.map(\.event.kind) == [.error, .usage, .usage])
        #expect(pending.map(\.id) == pending.map(\.id).sorted())
        // Each is the event the request would have had, rebuilt from its row.
        #expect(pending.map(\.event).suffix(2) == [SplunkEvent.usageEvent(first), SplunkEvent.usageEvent(last)])
        #expect(try await store.pendingEvents(after: 0, limit: 2) == Array(pending.prefix(2)))
        #expect(try await store.pendingEvents(after: pending[1].id, limit: 10) == [pending[2]])
        let counts = try await store.outboxCounts()
        #expect(counts.usage == 2 && counts.error == 1 && counts.oldest == old)

        // Old rows go with the retention purge, but never one whose event Splunk has yet to get.
        try await store.delivered(pending[0].id...pending[1].id)
        try await store.settled(through: pending[1].id)
        let purged = try await store.commit([], events: [], purgingLogBefore: old + 1, purgeLimit: 10)
        #expect(purged == 2)
        #expect(try TestDatabase.rows(path, "SELECT model FROM request_log").map { $0["model"] as String } == ["o3"])
        // The cursor never moves back.
        try await store.settled(through: 0)
        #expect(try await store.pendingEvents(after: 0, limit: 10) == [pending[2]])

        // Reopened: the same queue, and new ids above every one before.
        try await store.close()
        store = try SQLiteLedger.open(path: path)
        #expect(try await store.pendingEvents(after: 0, limit: 10) == [pending[2]])
        var next = Self.entry(model: "gpt-4o")
        next.hasUsageEvent = true
        _ = try await store.commit([next], events: [], purgingLogBefore: nil, purgeLimit: 0)
        let ids = try await store.pendingEvents(after: 0, limit: 10).map(\.id)
        #expect(ids.count == 2 && ids[0] == pending[2].id && ids[1] > ids[0])
        #expect(try await store.outboxCounts().usage == 2)
        try await store.close()
    }

    /// A database written before usage events came from the request log: the usage events its outbox holds are still
    /// sent, its log rows are not sent again, and new ids go above both tables' (which overlapped).
    @Test func outboxEventsFromBeforeTheUpgradeAreSentAndOldLogRowsAreNot() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        let queue = try DatabaseQueue(path: path)
        try SQLiteLedger.migrator.migrate(queue, upTo: "3 keys registry")
        try await queue.write { db in
            for id in 1...2 {
                try db.execute(
                    sql: """
                        INSERT INTO request_log (id, finished_at, request_id, key_id, subkey_hash, model, status_code,
                          prompt_tokens, completion_tokens, total_tokens, is_streaming, latency_ms, client_disconnected,
                          client_ip, x_forwarded_for)
                        VALUES (?, 1, 'before', 'k', 'h', 'gpt-4o', 200, 0, 0, 0, 0, 1, 0, '127.0.0.1', '')
                        """,
                    arguments: [id]
                )
                try db.execute(
                    sql: "INSERT INTO splunk_outbox (id, kind, time, event) VALUES (?, 'usage', 1, ?)",
                    arguments: [id, Data(#"{"before":\#(id)}"#.utf8)]
                )
            }
        }
        try queue.close()

        let store = try SQLiteLedger.open(path: path)
        var entry = Self.entry(model: "o3")
        entry.hasUsageEvent = true
        _ = try await store.commit([entry], events: [], purgingLogBefore: nil, purgeLimit: 0)
        let pending = try await store.pendingEvents(after: 0, limit: 10)
        #expect(pending.map(\.id) == [1, 2, 3])
        #expect(pending.prefix(2).map { String(decoding: $0.event.body, as: UTF8.self) } == [#"{"before":1}"#, #"{"before":2}"#])
        #expect(pending[2].event == SplunkEvent.usageEvent(entry))
        try await store.close()
    }
}

extension LedgerTests {
    /// With no index on `finished_at` (one page less per commit), a time is found in the request log by bisecting
    /// ids, which have gaps (outbox events take ids from the same sequence).
    /// A row that finished within the hour before one written ahead of it (a late write, a clock stepped back) is
    /// still found by readers that start from a time (`hec replay` here, `keys list`'s last use).
    @Test func aRowWrittenALittleOutOfOrderIsStillRead() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let store = try SQLiteLedger.open(path: directory.appendingPathComponent("quota.db").path)
        let since = 1_000_000.0
        // Ids 1, 2, 3: the middle one finished before `since`, so a bisection for `since` alone would skip id 1.
        for finished in [since + 5, since - 10, since + 20] {
            var entry = Self.entry(model: "gpt-4o")
            entry.finishedAt = finished
            _ = try await store.commit([entry], events: [], purgingLogBefore: nil, purgeLimit: 0)
        }
        let read = try await store.requestLog(after: 0, since: since, until: since + 60, limit: 10)
        #expect(read.map(\.entry.finishedAt) == [since + 5, since + 20])
        try await store.close()
    }

    @Test func theRequestLogIsBisectedByTime() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let store = try SQLiteLedger.open(path: directory.appendingPathComponent("quota.db").path)
        #expect(try await store.database.read { try SQLiteLedger.firstLogID(finishedAtOrAfter: 0, $0) } == nil)
        let refusal = OutboxEvent(kind: .error, time: 0, body: Array(#"{"event_type":"error"}"#.utf8))
        for index in 0..<50 {
            var entry = Self.entry(model: "gpt-4o")
            entry.finishedAt = Double(1_000 + index * 10)
            let events = Array(repeating: refusal, count: index % 4)
            _ = try await store.commit([entry], events: events, purgingLogBefore: nil, purgeLimit: 0)
        }
        try await store.database.read { db in
            let rows = try Row.fetchAll(db, sql: "SELECT id, finished_at FROM request_log ORDER BY id").map {
                (id: $0["id"] as Int64, finished: $0["finished_at"] as Double)
            }
            #expect(rows.count == 50 && rows.last!.id > 60)
            for time in stride(from: 990.0, through: 1_500, by: 5) {
                let found = try SQLiteLedger.firstLogID(finishedAtOrAfter: time, db)
                let expected = rows.first { $0.finished >= time }
                if let expected, let found {
                    // No row below it finished at or after the time; the first at or above it is the one that did.
                    #expect(rows.allSatisfy { $0.id >= found || $0.finished < time })
                    #expect(rows.first { $0.id >= found }?.id == expected.id, "\(time)")
                } else {
                    #expect(found == nil && expected == nil, "\(time)")
                }
            }
        }
        try await store.close()
    }
}
