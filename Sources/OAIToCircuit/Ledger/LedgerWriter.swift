import GRDB
import Logging
import ServiceLifecycle
import Synchronization

/// The one writer of the ledger, with group commit: records that arrive while a transaction is being written wait
/// and go together in the next one, so a busy bridge pays one commit for many requests and an idle one pays no
/// timer. The first request to find the writer idle writes its own record; when its transaction ends, the first
/// of those that waited meanwhile writes all of theirs, and so on.
///
/// `commit(_:)` returns once its record is durable. A failed transaction is logged and counted, its records are
/// kept (up to `maximumUnwritten`) and written with the next one or by the writer's retry every second (it is a
/// `Service`), and `/health` reports the database unusable until a commit succeeds again; the waiting requests are
/// answered all the same (bookkeeping never holds an answer back for ever).
public final class LedgerWriter: Sendable {
    /// How many records a failing database may hold in memory for a later attempt; beyond that the oldest go.
    static let maximumUnwritten = 100_000
    /// Request-log rows removed per transaction when old rows are due to go, so a purge never makes a long one.
    static let purgeBatch = 5_000
    /// How often old request-log rows are looked for.
    static let purgeInterval = 3_600.0

    public struct Health: Sendable {
        public var isHealthy = true
        public var lastError: String?
        /// Records kept in memory after a failed commit.
        public var unwritten = 0
        public var lastCommitAt: Double?
        public var droppedRecords = 0
    }

    private enum Turn: Sendable {
        case written
        case lead([LedgerEntry], followers: [CheckedContinuation<Turn, Never>])
    }

    private struct State {
        var writing = false
        var pending: [LedgerEntry] = []
        var waiting: [CheckedContinuation<Turn, Never>] = []
        var unwritten: [LedgerEntry] = []
        var lastPurge = -Double.infinity
        var health = Health()
    }

    public let store: any LedgerStore
    private let retention: Double
    private let clock: BridgeClock
    private let logger: Logger
    private let metrics: BridgeMetrics?
    private let state = Mutex(State())

    /// `retentionDays`: how long request-log rows are kept (`USAGE_LOG_RETENTION_DAYS`).
    public init(store: any LedgerStore, retentionDays: Int, clock: BridgeClock, logger: Logger, metrics: BridgeMetrics?) {
        self.store = store
        self.retention = Double(retentionDays) * PeriodCalendar.secondsPerDay
        self.clock = clock
        self.logger = logger
        self.metrics = metrics
    }

    public var health: Health { state.withLock { $0.health } }

    /// Records waiting for the transaction under way to end.
    var queued: Int { state.withLock { $0.pending.count } }

    /// Returns when `entry` is committed (or its transaction failed and it is kept for the next one).
    public func commit(_ entry: LedgerEntry) async {
        let turn = await withCheckedContinuation { (continuation: CheckedContinuation<Turn, Never>) in
            let leads = state.withLock { state in
                if state.writing {
                    state.pending.append(entry)
                    state.waiting.append(continuation)
                    return false
                }
                state.writing = true
                return true
            }
            if leads { continuation.resume(returning: .lead([entry], followers: [])) }
        }
        guard case .lead(let batch, let followers) = turn else { return }
        await lead(batch, followers: followers)
    }

    /// Writes a batch as the writer, answers its followers, then hands the role to the first record that arrived
    /// meanwhile, with everything that waits.
    private func lead(_ batch: [LedgerEntry], followers: [CheckedContinuation<Turn, Never>]) async {
        await write(batch)
        for follower in followers { follower.resume(returning: .written) }
        let next = state.withLock {
            state -> (CheckedContinuation<Turn, Never>, [LedgerEntry], [CheckedContinuation<Turn, Never>])? in
            guard let first = state.waiting.first else {
                state.writing = false
                return nil
            }
            defer {
                state.pending = []
                state.waiting = []
            }
            return (first, state.pending, Array(state.waiting.dropFirst()))
        }
        if let (leader, entries, followers) = next { leader.resume(returning: .lead(entries, followers: followers)) }
    }

    /// Writes what an earlier failure left, then `batch`, in one transaction.
    private func write(_ batch: [LedgerEntry]) async {
        let now = clock.now()
        let (entries, cutoff) = state.withLock { state -> ([LedgerEntry], Double?) in
            let entries = state.unwritten.isEmpty ? batch : state.unwritten + batch
            state.unwritten = []
            guard now - state.lastPurge >= Self.purgeInterval else { return (entries, nil) }
            return (entries, now - retention)
        }
        let started = ContinuousClock.now
        do {
            let purged = try await store.commit(entries, purgingLogBefore: cutoff, purgeLimit: Self.purgeBatch)
            metrics?.ledgerCommitted(records: entries.count, duration: ContinuousClock.now - started)
            state.withLock { state in
                if cutoff != nil, purged < Self.purgeBatch { state.lastPurge = now }
                if !state.health.isHealthy {
                    logger.notice("ledger writes again", metadata: ["records": "\(entries.count)"])
                }
                state.health.isHealthy = true
                state.health.lastError = nil
                state.health.unwritten = 0
                state.health.lastCommitAt = now
            }
            if purged > 0 { logger.info("request log purged", metadata: ["rows": "\(purged)"]) }
        } catch {
            metrics?.ledgerFailed()
            let description = Self.describe(error)
            let (dropped, firstFailure) = state.withLock { state -> (Int, Bool) in
                let firstFailure = state.health.isHealthy
                var kept = entries + state.unwritten
                let dropped = max(0, kept.count - Self.maximumUnwritten)
                if dropped > 0 { kept.removeFirst(dropped) }
                state.unwritten = kept
                state.health.isHealthy = false
                state.health.lastError = description
                state.health.unwritten = kept.count
                state.health.droppedRecords += dropped
                return (dropped, firstFailure)
            }
            let metadata: Logger.Metadata = [
                "error": "\(description)", "records": "\(entries.count)", "dropped": "\(dropped)",
                "database": "\(store.location)",
            ]
            if firstFailure || dropped > 0 {
                logger.error("ledger commit failed; records kept for the next attempt", metadata: metadata)
            } else {
                logger.debug("ledger commit failed again", metadata: metadata)
            }
        }
    }

    /// Writes records an earlier failure left behind (at shutdown).
    public func flush() async {
        let leads = state.withLock { state in
            guard !state.unwritten.isEmpty, !state.writing else { return false }
            state.writing = true
            return true
        }
        if leads { await lead([], followers: []) }
    }

    /// An error's description fit for logs and `/health`: for a database error, SQLite's code and message only.
    /// GRDB's own description may add the statement's arguments or a row's values, which can hold a key.
    static func describe(_ error: any Error) -> String {
        guard let error = error as? DatabaseError else {
            return String(describing: type(of: error))
        }
        var message = error.message ?? "no message"
        if let row = message.range(of: " in [") { message = String(message[..<row.lowerBound]) }
        return "SQLite error \(error.extendedResultCode.rawValue): \(message)"
    }
}

extension LedgerWriter: Service {
    /// How often records kept after a failed commit are tried again when no request comes to carry them.
    static let retryInterval: Duration = .seconds(1)

    /// Tries kept records again every `retryInterval`, so the ledger (and `/health` with it) recovers even when a
    /// load balancer, seeing 503, sends no more requests. Ends with graceful shutdown.
    public func run() async throws {
        try await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                try? await Task.sleep(for: Self.retryInterval)
                await self.flush()
            }
        }
    }
}
