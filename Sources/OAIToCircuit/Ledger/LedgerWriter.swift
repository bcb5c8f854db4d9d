import GRDB
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization

/// The one writer of the ledger, with group commit: records that arrive while a transaction is being written wait
/// and go together in the next one, so a busy bridge pays one commit for many requests and an idle one pays no
/// timer. The first request to find the writer idle writes its own record; when its transaction ends, the first
/// of those that waited meanwhile writes all of theirs, and so on.
///
/// A record's usage has its Splunk usage event when delivery is on: its request-log row is marked for the shipper,
/// which rebuilds the event from it (nothing more is written, and no JSON is made on the request path). A record
/// may also be only an event (a refusal's), queued in the outbox in the same way. Either takes a place in the
/// `SplunkSpool` first; when its share is full the event is dropped and counted, the usage is still written.
///
/// A request alone on its event loop (`LoopLoad`) whose record goes in a transaction of its own writes it on the loop
/// itself, sparing two thread wake-ups (the database's thread, then the loop again): about 20 µs of an answer at
/// concurrency 1. Blocking the loop then holds up nobody else. Under any concurrency commits go to the database's
/// thread as before, and so does one that would purge, wait for another process's lock, or wait behind other work
/// on the database's queue.
///
/// `commit(_:)` returns once its record is durable. A failed transaction is logged and counted, its records are
/// kept (up to `maximumUnwritten`) and written with the next one or by the writer's retry every second (it is a
/// `Service`), and `/health` reports the database unusable until a commit succeeds again; the waiting requests are
/// answered all the same (bookkeeping never holds an answer back for ever).
public final class LedgerWriter: Sendable {
    /// How many records a failing database may hold in memory for a later attempt; beyond that the oldest go.
    public static let maximumUnwritten = 100_000
    private let maximumUnwritten: Int
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

    /// One request's record: its usage (with or without its usage event), or a refusal's event.
    struct Item: Sendable {
        var entry: LedgerEntry?
        var event: OutboxEvent?
    }

    private enum Turn: Sendable {
        case written
        case lead([Item], followers: [Waiter])
    }

    /// A request waiting for its record's transaction, and the event loop it waits on (it is resumed there).
    private struct Waiter: Sendable {
        var continuation: CheckedContinuation<Turn, Never>
        var loop: (any EventLoop)?

        func resume(_ turn: Turn) {
            EventLoopAffinity.resume(on: loop) { continuation.resume(returning: turn) }
        }
    }

    private struct State {
        var writing = false
        var pending: [Item] = []
        var waiting: [Waiter] = []
        var unwritten: [Item] = []
        var lastPurge = -Double.infinity
        var health = Health()
    }

    public let store: any LedgerStore
    private let retention: Double
    private let clock: BridgeClock
    private let logger: Logger
    private let metrics: BridgeMetrics?
    /// Set when Splunk delivery is on: events are queued only then.
    public let spool: SplunkSpool?
    private let state = Mutex(State())
    /// Whether the caller may write on its own thread (see the type's doc; tests replace it).
    private let mayCommitAtOnce: @Sendable () -> Bool

    /// `retentionDays`: how long request-log rows are kept (`USAGE_LOG_RETENTION_DAYS`).
    public init(
        store: any LedgerStore,
        retentionDays: Int,
        clock: BridgeClock,
        logger: Logger,
        metrics: BridgeMetrics?,
        spool: SplunkSpool? = nil,
        maximumUnwritten: Int = LedgerWriter.maximumUnwritten,
        mayCommitAtOnce: (@Sendable () -> Bool)? = nil
    ) {
        self.maximumUnwritten = maximumUnwritten
        self.mayCommitAtOnce = mayCommitAtOnce ?? { LoopLoad.callerIsAlone }
        self.store = store
        self.retention = Double(retentionDays) * PeriodCalendar.secondsPerDay
        self.clock = clock
        self.logger = logger
        self.metrics = metrics
        self.spool = spool
    }

    public var health: Health { state.withLock { $0.health } }

    /// Records waiting for the transaction under way to end.
    var queued: Int { state.withLock { $0.pending.count } }

    /// Returns when `entry` (and its usage event, when delivery is on and the spool has a place for it) is
    /// committed, or its transaction failed and it is kept for the next one.
    public func commit(_ entry: LedgerEntry) async {
        var entry = entry
        entry.hasUsageEvent = admits(.usage)
        await commit(Item(entry: entry, event: nil))
    }

    /// Queues a Splunk event alone (a refusal's), durably, when it has a place in the spool.
    public func commit(event: OutboxEvent) async {
        guard admits(event.kind) else { return }
        await commit(Item(entry: nil, event: event))
    }

    /// Whether delivery is on and the spool has a place for an event of `kind`; a full share counts it dropped.
    private func admits(_ kind: OutboxEvent.Kind) -> Bool {
        guard let spool else { return false }
        let (accepted, firstDrop) = spool.reserve(kind)
        guard accepted else {
            metrics?.splunkDropped(kind: kind)
            if firstDrop {
                logger.warning(
                    "Splunk spool is full (SPLUNK_SPOOL_MAX_EVENTS): new \(kind.rawValue) events are dropped and counted",
                    metadata: ["usage_limit": "\(spool.usageLimit)", "error_limit": "\(spool.errorLimit)"]
                )
            }
            return false
        }
        return true
    }

    private func commit(_ item: Item) async {
        let loop = EventLoopAffinity.current
        let turn = await withCheckedContinuation { (continuation: CheckedContinuation<Turn, Never>) in
            let leads = state.withLock { state in
                if state.writing {
                    state.pending.append(item)
                    state.waiting.append(Waiter(continuation: continuation, loop: loop))
                    return false
                }
                state.writing = true
                return true
            }
            if leads { continuation.resume(returning: .lead([item], followers: [])) }
        }
        guard case .lead(let batch, let followers) = turn else { return }
        // A batch of one, whose request is its loop's only one (that loop is not blocked for anybody else).
        await lead(batch, followers: followers, atOnce: followers.isEmpty && batch.count == 1 && mayCommitAtOnce())
    }

    /// Writes a batch as the writer, answers its followers, then hands the role to the first record that arrived
    /// meanwhile, with everything that waits.
    private func lead(_ batch: [Item], followers: [Waiter], atOnce: Bool = false) async {
        await write(batch, atOnce: atOnce)
        for follower in followers { follower.resume(.written) }
        let next = state.withLock { state -> (Waiter, [Item], [Waiter])? in
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
        if let (leader, items, followers) = next { leader.resume(.lead(items, followers: followers)) }
    }

    /// Writes what an earlier failure left, then `batch`, in one transaction; on the caller's thread when `atOnce`
    /// and there is nothing else to do (nothing left from a failure, no purge due, no lock to wait for).
    private func write(_ batch: [Item], atOnce: Bool) async {
        let now = clock.now()
        let (items, cutoff) = state.withLock { state -> ([Item], Double?) in
            let items = state.unwritten.isEmpty ? batch : state.unwritten + batch
            state.unwritten = []
            guard now - state.lastPurge >= Self.purgeInterval else { return (items, nil) }
            return (items, now - retention)
        }
        let entries = items.compactMap(\.entry)
        let events = items.compactMap(\.event)
        let started = ContinuousClock.now
        do {
            let purged: Int
            if atOnce, cutoff == nil, items.count == batch.count, try store.commitAtOnce(entries, events: events) {
                purged = 0
            } else {
                purged = try await store.commit(
                    entries,
                    events: events,
                    purgingLogBefore: cutoff,
                    purgeLimit: Self.purgeBatch
                )
            }
            metrics?.ledgerCommitted(records: entries.count, duration: ContinuousClock.now - started)
            let (usage, errors) = Self.eventCounts(items)
            if usage + errors > 0 {
                metrics?.splunkQueued(usage: usage, errors: errors)
                spool?.committed(usage + errors)
            }
            state.withLock { state in
                if cutoff != nil, purged < Self.purgeBatch { state.lastPurge = now }
                if !state.health.isHealthy {
                    logger.notice("ledger writes again", metadata: ["records": "\(items.count)"])
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
            let (dropped, firstFailure) = state.withLock { state -> ([Item], Bool) in
                let firstFailure = state.health.isHealthy
                var kept = items + state.unwritten
                // Over the bound, refusals' events go first, oldest first: a flood of refused requests while the
                // database fails must not push out the usage that quotas count.
                var dropped: [Item] = []
                var excess = kept.count - maximumUnwritten
                if excess > 0 {
                    kept.removeAll { item in
                        guard excess > 0, item.entry == nil else { return false }
                        dropped.append(item)
                        excess -= 1
                        return true
                    }
                    if excess > 0 {
                        dropped += kept.prefix(excess)
                        kept.removeFirst(excess)
                    }
                }
                state.unwritten = kept
                state.health.isHealthy = false
                state.health.lastError = description
                state.health.unwritten = kept.count(where: { $0.entry != nil })
                state.health.droppedRecords += dropped.count(where: { $0.entry != nil })
                return (dropped, firstFailure)
            }
            let (lostUsage, lostErrors) = Self.eventCounts(dropped)
            if let spool, lostUsage + lostErrors > 0 {
                spool.lost(usage: lostUsage, errors: lostErrors)
                for _ in 0..<lostUsage { metrics?.splunkDropped(kind: .usage) }
                for _ in 0..<lostErrors { metrics?.splunkDropped(kind: .error) }
            }
            let metadata: Logger.Metadata = [
                "error": "\(description)", "records": "\(items.count)", "dropped": "\(dropped.count)",
                "database": "\(store.location)",
            ]
            if firstFailure || !dropped.isEmpty {
                logger.error("ledger commit failed; records kept for the next attempt", metadata: metadata)
            } else {
                logger.debug("ledger commit failed again", metadata: metadata)
            }
        }
    }

    /// The Splunk events `items` carry: usage (marked entries, and any usage event queued alone) and errors.
    private static func eventCounts(_ items: [Item]) -> (usage: Int, errors: Int) {
        var usage = 0
        var errors = 0
        for item in items {
            if item.entry?.hasUsageEvent == true { usage += 1 }
            switch item.event?.kind {
            case .usage?: usage += 1
            case .error?: errors += 1
            case nil: break
            }
        }
        return (usage, errors)
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
