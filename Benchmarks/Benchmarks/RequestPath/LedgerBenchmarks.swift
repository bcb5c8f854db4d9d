import Benchmark
import Foundation
import Logging
import OAIToCircuit

/// Committing answered requests to the SQLite ledger (`LedgerWriter.commit`) with their Splunk usage events (request-log
/// rows marked for the shipper), as `serve` does with Splunk on: one request at a time (a transaction each), and 64 at once (group commit shares transactions).
func ledgerBenchmarks() {
    Benchmark("LedgerWriter.commit, one at a time") { benchmark, ledger in
        await benchmark.measureAsync { await ledger.commit() }
    } setup: {
        try await LedgerFixture(name: "one")
    } teardown: {
        LedgerFixture.remove(name: "one")
    }

    Benchmark("LedgerWriter.commit, 64 concurrent (per 64)") { benchmark, ledger in
        await benchmark.measureAsync {
            await withDiscardingTaskGroup { group in
                for _ in 0..<64 { group.addTask { await ledger.commit() } }
            }
        }
    } setup: {
        try await LedgerFixture(name: "concurrent")
    } teardown: {
        LedgerFixture.remove(name: "concurrent")
    }
}

/// A ledger writer over a new SQLite file in the temporary directory, and one answered request's entry.
struct LedgerFixture: Sendable {
    let writer: LedgerWriter
    let entry: LedgerEntry

    init(name: String) async throws {
        let directory = Self.directory(name)
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let path = directory.appending(path: "quota.db").path
        let store = try SQLiteLedger.open(path: path)
        entry = Self.entry()
        writer = LedgerWriter(
            store: store,
            retentionDays: 90,
            clock: .fixed,
            logger: Logger(label: "ledger", factory: { _ in SwiftLogNoOpLogHandler() }),
            metrics: nil,
            // Nothing ships the events: a spool this size never drops one during a run.
            spool: SplunkSpool(maximumEvents: 100_000_000, batchSize: 500)
        )
    }

    func commit() async {
        await writer.commit(entry)
    }

    static func directory(_ name: String) -> URL {
        FileManager.default.temporaryDirectory.appending(path: "oai-to-circuit-benchmarks-\(getpid())-\(name)")
    }

    static func remove(name: String) {
        try? FileManager.default.removeItem(at: directory(name))
    }

    /// An answered request's entry, as the bridge makes it: a policy-file key, 376 tokens, a proxied client.
    private static func entry() -> LedgerEntry {
        let caller = Caller(subkey: "team_member_alice", friendlyName: "Alice", email: "alice@example.com")
        let record = UsageRecord(
            requestID: "req-4f1c2a9e0b7d",
            finishedAt: BridgeClock.fixed.now(),
            admission: Admission(caller: caller, model: "gpt-4o", admittedAt: BridgeClock.fixed.now()),
            statusCode: 200,
            usage: Usage(promptTokens: 245, completionTokens: 131),
            isStreaming: false,
            latency: .microseconds(812_500),
            clientDisconnected: false,
            clientAddress: "10.0.0.12",
            forwardedFor: "203.0.113.9, 10.0.0.1"
        )
        return LedgerEntry(record)
    }
}
