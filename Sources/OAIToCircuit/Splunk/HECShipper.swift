import Logging
import ServiceLifecycle
import Synchronization

/// Sends the outbox to Splunk, off the request path: batches of up to `SPLUNK_BATCH_MAX_EVENTS` events and
/// `SPLUNK_BATCH_MAX_BYTES`, sent when a full batch is ready or at the latest every `SPLUNK_FLUSH_INTERVAL_MS`, a
/// few at a time over keep-alive connections. An event leaves the outbox only once Splunk has it (at least once).
///
/// Splunk's answers decide the rest (`HECVerdict`): transport errors, timeouts, 5xx, 429 and 408 are retried with
/// backoff (1 s doubling to 60 s, with jitter), one batch at a time until one gets through; a bad token, an unknown
/// index or a wrong path pause delivery (everything kept, tried again every `pauseInterval`) and say why in
/// `/health` and the log; 413 splits a batch; an event Splunk refuses as malformed is kept aside in the dead-letter
/// table with Splunk's answer, and the events after it are sent again.
///
/// As a `Service` it runs beside the listeners and, at shutdown, sends what is left while Splunk answers, for at
/// most the grace period; what it cannot send stays in the outbox for the next start. `hec replay` runs the same
/// loop over the request log (`ship(until:)`).
public final class HECShipper: Sendable {
    public struct Status: Sendable {
        public var lastSuccessAt: Double?
        public var lastError: String?
        public var lastErrorAt: Double?
        /// Why delivery is paused (a configuration problem), while it is.
        public var paused: String?
        public var sent = 0
        public var deadLettered = 0
        /// Age of the oldest event the shipper holds, in seconds.
        public var oldestPendingAge = 0.0
    }

    /// What a run of the loop achieved (`hec replay` prints it).
    public struct Outcome: Sendable {
        public var sent = 0
        public var deadLettered = 0
        /// Why it stopped before everything was sent, if it did.
        public var failure: String?
    }

    public struct Tuning: Sendable {
        public var maximumEvents = 500
        public var maximumBytes = 1 << 20
        public var flushInterval: Duration = .seconds(1)
        /// Batches sent at once while Splunk accepts them.
        public var inFlight = 4
        public var firstRetry: Duration = .seconds(1)
        /// How often a paused delivery (bad token, unknown index) is tried again.
        public var pauseInterval: Duration = .seconds(30)
        /// How long a shutdown may spend sending what is left.
        public var drainLimit: Duration = .seconds(30)
        /// Told the status after every round of sends (tests await progress with it).
        public var observe: (@Sendable (Status) -> Void)?

        init() {}

        init(_ settings: BridgeConfiguration.Splunk, drainLimit: Duration) {
            maximumEvents = settings.batchMaxEvents
            maximumBytes = settings.batchMaxBytes
            flushInterval = settings.flushInterval
            self.drainLimit = drainLimit
        }
    }

    /// A run of events read together, and the HEC payload they make.
    struct Batch: Sendable {
        var events: [PendingEvent]
        var payload: [UInt8]
        var ids: ClosedRange<Int64> { events[0].id...events[events.count - 1].id }
    }

    private struct Control {
        var draining = false
        var drainDeadline = ContinuousClock.Instant.now
        var status = Status()
    }

    let client: HECClient
    let outbox: any SplunkOutbox
    let spool: SplunkSpool?
    let envelope: SplunkEnvelope
    let tuning: Tuning
    private let doorbell: Doorbell
    private let clock: BridgeClock
    private let metrics: BridgeMetrics?
    private let logger: Logger
    private let control = Mutex(Control())

    init(
        client: HECClient,
        outbox: any SplunkOutbox,
        spool: SplunkSpool?,
        envelope: SplunkEnvelope,
        tuning: Tuning,
        clock: BridgeClock = .system,
        metrics: BridgeMetrics?,
        logger: Logger
    ) {
        self.client = client
        self.outbox = outbox
        self.spool = spool
        self.envelope = envelope
        self.tuning = tuning
        self.doorbell = spool?.doorbell ?? Doorbell()
        self.clock = clock
        self.metrics = metrics
        self.logger = logger
    }

    public var status: Status { control.withLock { $0.status } }

    /// Stops waiting for full batches and sends everything, for at most `drainLimit`.
    func beginDrain() {
        control.withLock { control in
            guard !control.draining else { return }
            control.draining = true
            control.drainDeadline = .now + tuning.drainLimit
        }
        doorbell.ring()
    }

    private var drainDeadline: ContinuousClock.Instant? {
        control.withLock { $0.draining ? $0.drainDeadline : nil }
    }

    // MARK: The loop

    /// Ships until cancelled or, once draining, until nothing is left (or Splunk fails, or the drain deadline
    /// passes). `maximumFailures` ends it after that many failed attempts in a row, and at the first pause
    /// (`hec replay`: a command does not wait for an operator to fix a token).
    func ship(maximumFailures: Int? = nil) async -> Outcome {
        var outcome = Outcome()
        var cursor: Int64 = 0
        var readAhead: [PendingEvent] = []
        var retries: [Batch] = []
        var moreInOutbox = true
        var due = true
        var backoff = HECBackoff(first: tuning.firstRetry)
        var resumeAt: ContinuousClock.Instant?
        var failures = 0

        while !Task.isCancelled {
            let deadline = drainDeadline
            if let deadline, ContinuousClock.now >= deadline { break }
            if let waitUntil = resumeAt, ContinuousClock.now < waitUntil {
                // Splunk is failing: a shutdown does not wait for it (what is left ships after the next start).
                if deadline != nil { break }
                await doorbell.wait(timeout: ContinuousClock.now.duration(to: waitUntil))
                continue
            }
            let capacity = resumeAt == nil ? tuning.inFlight : 1
            if readAhead.count < tuning.maximumEvents * capacity, moreInOutbox || due || deadline != nil {
                let unread = spool?.takeUnread() ?? 0
                do {
                    let limit = tuning.maximumEvents * capacity - readAhead.count
                    let read = try await outbox.pendingEvents(after: cursor, limit: limit)
                    cursor = read.last?.id ?? cursor
                    readAhead += read
                    moreInOutbox = read.count == limit
                    due = false
                } catch {
                    spool?.committed(unread)  // keep the hint for the next attempt
                    logger.error(
                        "cannot read the Splunk outbox",
                        metadata: ["error": "\(LedgerWriter.describe(error))"]
                    )
                    await doorbell.wait(timeout: tuning.firstRetry)
                    continue
                }
            }
            var batches: [Batch] = []
            while batches.count < capacity, !retries.isEmpty { batches.append(retries.removeFirst()) }
            while batches.count < capacity, !readAhead.isEmpty {
                let (count, payload) = HECBatch.take(
                    readAhead[...],
                    envelope: envelope,
                    maximumEvents: tuning.maximumEvents,
                    maximumBytes: tuning.maximumBytes
                )
                batches.append(Batch(events: Array(readAhead.prefix(count)), payload: payload))
                readAhead.removeFirst(count)
            }
            if batches.isEmpty {
                updateGauges(oldest: nil)
                if deadline != nil || maximumFailures != nil { break }
                await doorbell.wait(timeout: tuning.flushInterval)
                due = true
                continue
            }

            var failed: (reason: String, paused: Bool)?
            var answered = false
            for (batch, verdict, duration) in await send(batches) {
                metrics?.splunkBatch(outcome: verdict.label, duration: duration)
                switch verdict {
                case .delivered:
                    answered = true
                    await acknowledge(batch.events[...], outcome: &outcome)
                case .retry(let reason), .paused(let reason):
                    retries.append(batch)
                    metrics?.splunkRetried(batch.events.count)
                    let paused = if case .paused = verdict { true } else { false }
                    if failed == nil || paused { failed = (reason, paused) }
                case .tooLarge:
                    answered = true
                    await split(batch, answer: "413 Content too large", into: &retries, outcome: &outcome)
                case .malformed(let answer):
                    answered = true
                    await split(batch, answer: answer, into: &retries, outcome: &outcome)
                case .rejected(let number, let answer):
                    answered = true
                    guard number < batch.events.count else {
                        await split(batch, answer: answer, into: &retries, outcome: &outcome)
                        continue
                    }
                    await acknowledge(batch.events[..<number], outcome: &outcome)
                    await setAside(batch.events[number], answer: answer, outcome: &outcome)
                    let rest = Array(batch.events[(number + 1)...])
                    if !rest.isEmpty { retries.append(self.batch(rest)) }
                }
            }
            retries.sort { $0.events[0].id < $1.events[0].id }
            defer { tuning.observe?(status) }
            updateGauges(oldest: retries.first?.events.first?.event.time ?? readAhead.first?.event.time)

            if let (reason, paused) = failed {
                failures += 1
                let wait = paused ? tuning.pauseInterval : backoff.next(unit: Double.random(in: 0..<1))
                resumeAt = .now + wait
                noteFailure(reason, paused: paused, firstInARun: failures == 1, retryIn: wait)
                if let maximumFailures, paused || failures >= maximumFailures {
                    outcome.failure = reason
                    break
                }
            } else if answered {
                if resumeAt != nil { logger.notice("Splunk accepts events again", metadata: ["after_failures": "\(failures)"]) }
                resumeAt = nil
                failures = 0
                backoff.reset()
                control.withLock { $0.status.paused = nil }
            }
        }
        return outcome
    }

    /// Sends the batches side by side; results in the batches' order.
    private func send(_ batches: [Batch]) async -> [(Batch, HECVerdict, Duration)] {
        await withTaskGroup(of: (Int, HECVerdict, Duration).self) { group in
            for (index, batch) in batches.enumerated() {
                group.addTask {
                    let started = ContinuousClock.now
                    let verdict: HECVerdict
                    do {
                        let (status, answer) = try await self.client.post(batch.payload)
                        verdict = .of(status: status, body: answer)
                    } catch {
                        verdict = .retry(reason: HECClient.describe(error))
                    }
                    return (index, verdict, ContinuousClock.now - started)
                }
            }
            var results = [(HECVerdict, Duration)?](repeating: nil, count: batches.count)
            for await (index, verdict, duration) in group { results[index] = (verdict, duration) }
            return zip(batches, results).map { batch, result in (batch, result!.0, result!.1) }
        }
    }

    /// A 413 or a malformed batch without an event number: halves are sent again (no backoff: Splunk answered);
    /// a single event is set aside.
    private func split(_ batch: Batch, answer: String, into retries: inout [Batch], outcome: inout Outcome) async {
        guard batch.events.count > 1 else {
            await setAside(batch.events[0], answer: answer, outcome: &outcome)
            return
        }
        let half = batch.events.count / 2
        retries.append(self.batch(Array(batch.events[..<half])))
        retries.append(self.batch(Array(batch.events[half...])))
    }

    private func batch(_ events: [PendingEvent]) -> Batch {
        var payload: [UInt8] = []
        for pending in events { envelope.wrap(pending.event, into: &payload) }
        return Batch(events: events, payload: payload)
    }

    private func acknowledge(_ events: ArraySlice<PendingEvent>, outcome: inout Outcome) async {
        guard let first = events.first, let last = events.last else { return }
        do {
            try await outbox.delivered(first.id...last.id)
        } catch {
            logger.error(
                "cannot remove delivered events from the Splunk outbox; they will be sent again after a restart",
                metadata: ["error": "\(LedgerWriter.describe(error))", "events": "\(events.count)"]
            )
        }
        let errors = events.count(where: { $0.event.kind == .error })
        spool?.release(usage: events.count - errors, errors: errors)
        metrics?.splunkSent(events.count)
        outcome.sent += events.count
        let now = clock.now()
        control.withLock { control in
            control.status.sent += events.count
            control.status.lastSuccessAt = now
        }
    }

    private func setAside(_ event: PendingEvent, answer: String, outcome: inout Outcome) async {
        let answer = String(answer.prefix(2_000))
        do {
            try await outbox.deadLetter(event, answer: answer, at: clock.now())
        } catch {
            logger.error(
                "cannot move a refused event to the dead-letter table",
                metadata: ["error": "\(LedgerWriter.describe(error))"]
            )
        }
        spool?.release(usage: event.event.kind == .usage ? 1 : 0, errors: event.event.kind == .error ? 1 : 0)
        metrics?.splunkDeadLettered()
        outcome.deadLettered += 1
        control.withLock { $0.status.deadLettered += 1 }
        logger.warning(
            "Splunk refused an event as malformed; it is kept in splunk_dead_letter and not sent again",
            metadata: ["answer": "\(answer)", "outbox_id": "\(event.id)", "kind": "\(event.event.kind.rawValue)"]
        )
    }

    private func noteFailure(_ reason: String, paused: Bool, firstInARun: Bool, retryIn wait: Duration) {
        let now = clock.now()
        let (changed, pending) = control.withLock { control -> (Bool, Int) in
            let changed = control.status.lastError != reason || firstInARun
            control.status.lastError = reason
            control.status.lastErrorAt = now
            control.status.paused = paused ? reason : nil
            return (changed, spool?.counts.pending ?? 0)
        }
        let metadata: Logger.Metadata = [
            "reason": "\(reason)", "pending": "\(pending)", "retry_in_ms": "\(wait.milliseconds)",
        ]
        if paused, changed {
            logger.error("Splunk delivery paused; events are kept", metadata: metadata)
        } else if changed {
            logger.warning("Splunk delivery failed; events are kept and retried", metadata: metadata)
        } else {
            logger.debug("Splunk delivery failed again", metadata: metadata)
        }
    }

    private func updateGauges(oldest: Double?) {
        let age = oldest.map { max(0, clock.now() - $0) } ?? 0
        control.withLock { $0.status.oldestPendingAge = age }
        if let spool { metrics?.splunkPending(spool.counts, oldestAge: age) }
    }
}

extension HECShipper: Service {
    public func run() async throws {
        if let spool, spool.counts.pending > 0 {
            logger.notice("Splunk events waiting from before are sent first", metadata: ["events": "\(spool.counts.pending)"])
        }
        let outcome = await withGracefulShutdownHandler {
            await self.ship()
        } onGracefulShutdown: {
            self.beginDrain()
        }
        let left = spool?.counts.pending ?? 0
        if left > 0 {
            logger.notice("Splunk events left for the next start", metadata: ["events": "\(left)", "sent": "\(outcome.sent)"])
        }
    }
}

extension HECVerdict {
    /// The `outcome` label of the batch duration metric.
    var label: String {
        switch self {
        case .delivered: "delivered"
        case .retry: "retry"
        case .paused: "paused"
        case .tooLarge: "too_large"
        case .rejected, .malformed: "rejected"
        }
    }
}
