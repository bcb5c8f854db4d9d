import Foundation
import GRDB
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

@testable import OAIToCircuit

/// A request alone on its event loop writes its record on the loop, without the database thread's two wake-ups;
/// anything else goes through the group commit as before.
extension LedgerTests {
    @Test func aRecordAloneIsWrittenAtOnceAndEverythingElseThroughTheGroupCommit() async throws {
        func transactions(declining: Bool = false, alone: Bool) async -> [String] {
            let store = TwoWayStore(declines: declining)
            let writer = LedgerWriter(
                store: store,
                retentionDays: 90,
                clock: .system,
                logger: Logger(label: "test"),
                metrics: nil,
                mayCommitAtOnce: { alone }
            )
            await writer.commit(Self.entry(model: "gpt-4o"))
            await writer.commit(Self.entry(model: "gpt-4o"))
            #expect(writer.health.isHealthy && writer.health.lastCommitAt != nil)
            return store.transactions.withLockedValue { $0 }
        }
        // The first commit also purges old request-log rows (due once an hour), which is never done at once.
        #expect(await transactions(alone: true) == ["group: 1", "at once: 1"])
        // Another request on the loop: the loop must not block on the database.
        #expect(await transactions(alone: false) == ["group: 1", "group: 1"])
        // Another process holds the write lock: the record waits its turn on the database's thread.
        #expect(await transactions(declining: true, alone: true) == ["group: 1", "declined", "group: 1"])
    }

    @Test func aCommitAtOnceNeverWaitsForAnotherConnectionsLock() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        let store = try SQLiteLedger.open(path: path)
        // Another process's write (a key command, say), its transaction still open.
        var configuration = Configuration()
        configuration.allowsUnsafeTransactions = true
        let other = try DatabaseQueue(path: path, configuration: configuration)
        try await other.writeWithoutTransaction { try $0.execute(sql: "BEGIN IMMEDIATE") }
        // It ends its transaction a second later, well inside the 2 s a waiting connection would wait.
        let release = Task.detached {
            try await Task.sleep(for: .seconds(1))
            try await other.writeWithoutTransaction { try $0.execute(sql: "COMMIT") }
        }

        #expect(try store.commitAtOnce([Self.entry(model: "gpt-4o")], events: []) == false)
        try await release.value
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM request_log") == 0)
        // The connection's own busy wait is back for the group commit, which waits for such a lock.
        #expect(try await store.database.read { try Int.fetchOne($0, sql: "PRAGMA busy_timeout") } == 2_000)

        let event = OutboxEvent(kind: .error, time: 1, body: Array(#"{"event_type":"error"}"#.utf8))
        #expect(try store.commitAtOnce([Self.entry(model: "gpt-4o")], events: [event]))
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM request_log") == 1)
        #expect(try TestDatabase.count(path, "SELECT count(*) FROM splunk_outbox") == 1)
        #expect(try TestDatabase.count(path, "SELECT sum(requests) FROM usage") == 1)
        try other.close()
        try await store.close()
    }

    @Test func aCommitAtOnceNeverWaitsBehindOtherWorkOnTheWritersQueue() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let store = try SQLiteLedger.open(path: directory.appendingPathComponent("quota.db").path)
        // A read holds the writer's queue (a policy reload's snapshot, say) until the test lets it go.
        let reading = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let read = Task {
            try await store.read { _ in
                reading.signal()
                release.wait()
            }
        }
        await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                reading.wait()
                continuation.resume()
            }
        }
        // Waiting behind the read would block here for good (and the suite would run out of time).
        #expect(try store.commitAtOnce([Self.entry(model: "gpt-4o")], events: []) == false)
        release.signal()
        try await read.value
        #expect(try store.commitAtOnce([Self.entry(model: "gpt-4o")], events: []))
        try await store.close()
    }

    @Test func aLoopIsAloneWhileItsConnectionsAnswerOneRequestAtMost() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let seen = try await group.next().submit { () -> [Bool] in
            var seen = [LoopLoad.callerIsAlone]  // no connection has used this loop yet
            let load = LoopLoad.ofCurrentThread()
            guard LoopLoad.ofCurrentThread() === load else { return [] }
            seen.append(LoopLoad.callerIsAlone)
            load.started()
            seen.append(LoopLoad.callerIsAlone)
            load.started()
            seen.append(LoopLoad.callerIsAlone)
            load.ended()
            seen.append(LoopLoad.callerIsAlone)
            load.ended()
            seen.append(load.requests == 0)
            return seen
        }.get()
        #expect(seen == [false, true, true, false, true, true])
        try await group.shutdownGracefully()
    }
}

/// A store that records which way each transaction came: at once (or declined, when it `declines`), or through the
/// group commit.
final class TwoWayStore: CommitOnlyStore {
    let declines: Bool
    let transactions = NIOLockedValueBox<[String]>([])

    init(declines: Bool) {
        self.declines = declines
    }

    var location: String { "memory" }

    func commitAtOnce(_ entries: [LedgerEntry], events: [OutboxEvent]) throws -> Bool {
        transactions.withLockedValue { $0.append(declines ? "declined" : "at once: \(entries.count)") }
        return !declines
    }

    func commit(
        _ entries: [LedgerEntry],
        events: [OutboxEvent],
        purgingLogBefore cutoff: Double?,
        purgeLimit: Int
    ) async throws -> Int {
        transactions.withLockedValue { $0.append("group: \(entries.count)") }
        return 0
    }
}

extension LedgerTests {
    /// Period rows are upserted two to a statement, and an odd one alone: each row gets exactly its own requests.
    @Test func periodRowsGoTwoToAStatementAndEachGetsItsOwnCounts() async throws {
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("quota.db").path
        let store = try SQLiteLedger.open(path: path)
        var first = Self.entry(model: "gpt-4o")
        (first.day, first.month) = ("2026-11-30", "2026-11")
        var second = Self.entry(model: "gpt-4o")
        (second.day, second.month) = ("2026-11-29", "2026-11")
        var other = Self.entry(model: "o3")
        (other.day, other.month) = ("2026-12-01", "2026-12")
        // Five period rows: two days and a month of gpt-4o, a day and a month of o3.
        _ = try await store.commit([first, second, other], events: [], purgingLogBefore: nil, purgeLimit: 0)
        _ = try await store.commit([first, second, other], events: [], purgingLogBefore: nil, purgeLimit: 0)
        #expect(try store.commitAtOnce([first], events: []))

        let rows = try TestDatabase.rows(
            path,
            "SELECT model, period, period_start, requests, total_tokens FROM usage_period ORDER BY model, period_start"
        )
        let seen = rows.map { row in
            "\(row["model"] as String) \(row["period"] as String) \(row["period_start"] as String) "
                + "\(row["requests"] as Int) \(row["total_tokens"] as Int)"
        }
        #expect(
            seen == [
                "gpt-4o monthly 2026-11 5 15", "gpt-4o daily 2026-11-29 2 6", "gpt-4o daily 2026-11-30 3 9",
                "o3 monthly 2026-12 2 6", "o3 daily 2026-12-01 2 6",
            ]
        )
        try await store.close()
    }
}
