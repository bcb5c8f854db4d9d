import Synchronization

/// The bounds of the Splunk outbox (`SPLUNK_SPOOL_MAX_EVENTS`) and the doorbell between the ledger writer, which
/// queues events, and the shipper, which sends them.
///
/// Error events have their own tenth of the spool, usage events the rest: a flood of refused requests (a client
/// with a wrong key in a retry loop) fills its own share and cannot push out usage events. When a share is full,
/// new events of that kind are dropped and counted, never silently.
public final class SplunkSpool: Sendable {
    public struct Counts: Sendable, Equatable {
        public var pendingUsage = 0
        public var pendingErrors = 0
        public var droppedUsage = 0
        public var droppedErrors = 0
        public var pending: Int { pendingUsage + pendingErrors }
    }

    private struct State {
        var counts = Counts()
        /// Events committed since the shipper last looked.
        var unread = 0
        /// Kinds whose share is full and whose new events are being dropped.
        var dropping: Set<OutboxEvent.Kind> = []
    }

    public let usageLimit: Int
    public let errorLimit: Int
    /// Unread events that make a full batch: the shipper is woken at once instead of at its next flush.
    let batchSize: Int
    /// Rung when a full batch is ready.
    let doorbell = Doorbell()
    private let state = Mutex(State())

    public init(maximumEvents: Int, batchSize: Int) {
        let errorShare = max(1, maximumEvents / 10)
        self.errorLimit = errorShare
        self.usageLimit = max(1, maximumEvents - errorShare)
        self.batchSize = batchSize
    }

    public var counts: Counts { state.withLock { $0.counts } }

    /// What the outbox held at start; the shipper reads it all first.
    func load(_ outbox: OutboxCounts) {
        state.withLock { state in
            state.counts.pendingUsage = outbox.usage
            state.counts.pendingErrors = outbox.error
            state.unread = outbox.pending
        }
    }

    /// Takes a place for an event of `kind`, or counts it dropped when its share is full. Returns whether it has
    /// one, and whether this drop starts a run of them (to log once per run, not per event).
    func reserve(_ kind: OutboxEvent.Kind) -> (accepted: Bool, firstDrop: Bool) {
        state.withLock { state in
            let full =
                kind == .usage
                ? state.counts.pendingUsage >= usageLimit : state.counts.pendingErrors >= errorLimit
            guard !full else {
                if kind == .usage { state.counts.droppedUsage += 1 } else { state.counts.droppedErrors += 1 }
                return (false, state.dropping.insert(kind).inserted)
            }
            if kind == .usage { state.counts.pendingUsage += 1 } else { state.counts.pendingErrors += 1 }
            state.dropping.remove(kind)
            return (true, false)
        }
    }

    /// Gives back places: events delivered, set aside, or lost before they were written.
    func release(usage: Int, errors: Int) {
        state.withLock { state in
            state.counts.pendingUsage = max(0, state.counts.pendingUsage - usage)
            state.counts.pendingErrors = max(0, state.counts.pendingErrors - errors)
        }
    }

    /// Counts events lost before they were written (the ledger's own memory bound) as dropped.
    func lost(usage: Int, errors: Int) {
        release(usage: usage, errors: errors)
        state.withLock { state in
            state.counts.droppedUsage += usage
            state.counts.droppedErrors += errors
        }
    }

    /// `count` events are committed: wake the shipper when they make a full batch (once: not again with each
    /// commit while it is busy or waiting out a failure).
    @discardableResult
    func committed(_ count: Int) -> Bool {
        guard count > 0 else { return false }
        let full = state.withLock { state in
            let before = state.unread
            state.unread += count
            return before < batchSize && state.unread >= batchSize
        }
        if full { doorbell.ring() }
        return full
    }

    /// Puts back what `takeUnread()` took, when the read it was for failed (without waking anyone).
    func restore(_ count: Int) {
        state.withLock { $0.unread += count }
    }

    /// How many events were committed since the last call (a hint that the outbox has more to read).
    func takeUnread() -> Int {
        state.withLock { state in
            defer { state.unread = 0 }
            return state.unread
        }
    }
}

/// Wakes one waiting task early: `wait(timeout:)` returns when rung, after its timeout, or when cancelled. A ring
/// with nobody waiting is kept for the next wait.
final class Doorbell: Sendable {
    private struct State {
        var rung = false
        var waiter: CheckedContinuation<Void, Never>?
    }

    private let state = Mutex(State())

    func ring() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard let waiter = state.waiter else {
                state.rung = true
                return nil
            }
            state.waiter = nil
            return waiter
        }
        waiter?.resume()
    }

    func wait(timeout: Duration) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.waitForRing() }
            group.addTask { try? await Task.sleep(for: timeout) }
            await group.next()
            group.cancelAll()
        }
    }

    private func waitForRing() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let now = state.withLock { state in
                    // Checked under the lock: a cancellation handler that ran before found no waiter to resume.
                    if state.rung || Task.isCancelled {
                        state.rung = false
                        return true
                    }
                    precondition(state.waiter == nil, "a doorbell has one waiter")
                    state.waiter = continuation
                    return false
                }
                if now { continuation.resume() }
            }
        } onCancel: {
            state.withLock { state in
                defer { state.waiter = nil }
                return state.waiter
            }?.resume()
        }
    }
}
