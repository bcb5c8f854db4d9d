import Logging
import ServiceLifecycle
import Synchronization

/// Sends the outbox to Splunk, off the request path: batches of up to `SPLUNK_BATCH_MAX_EVENTS` events and
/// `SPLUNK_BATCH_MAX_BYTES`, sent when a full batch is ready or at the latest every `SPLUNK_FLUSH_INTERVAL_MS`, a
/// few at a time over keep-alive connections. An event leaves the outbox only once Splunk has it (at least once).
///
/// Splunk's answers decide the rest (`HECVerdict`): transport errors, timeouts, 5xx, 429 and 408 are retried with
/// backoff (1 s doubling to 60 s, with jitter), one batch at a time until one gets through; a bad token, an unknown
/// index, a wrong path or an answer that is not Splunk's pause delivery (everything kept, tried again every
/// `pauseInterval`) and say why in `/health` and the log; 413 splits a batch (and lowers the byte limit); an event
/// Splunk refuses as malformed is kept aside in the dead-letter table with Splunk's answer, and the events after it
/// are sent again. Should Splunk refuse event after event with nothing accepted in between, delivery pauses
/// instead: a systematic fault (a proxy mangling bodies) must not empty the outbox into the dead-letter table.
///
/// As a `Service` it runs beside the listeners and, at shutdown, sends what is left while Splunk answers, until
/// the grace period (counted from the signal) is nearly over; what it cannot send stays in the outbox for the next
/// start. `hec replay` runs the same loop over the request log (`ship(maximumFailures:)`).
public final class HECShipper: Sendable {
    public struct Status: Sendable {
        public var lastSuccessAt: Double?
        public var lastError: String?
        public var lastErrorAt: Double?
        /// Why delivery is paused (a configuration problem), while it is.
        public var paused: String?
        /// Events delivered since start.
        public var sent = 0
        /// Events in the dead-letter table.
        public var deadLettered = 0
        /// Age of the oldest event waiting, in seconds.
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
        /// How long a shutdown may spend sending what is left (from the signal, when `shutdownBegan()` is told).
        public var drainLimit: Duration = .seconds(30)
        /// Events set aside in a row, with none accepted in between, after which delivery pauses instead.
        public var setAsideRunLimit = 10
        /// Told the status after every round of sends and every idle wake (tests await progress with it).
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
        /// When shutdown began (the signal): the drain ends shortly before the grace period does.
        var shutdownBegan: ContinuousClock.Instant?
        var drainDeadline: ContinuousClock.Instant?
        var status = Status()
        /// Time of the oldest event waiting, for `oldestPendingAge`.
        var oldest: Double?
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

    /// `initial`: what the outbox held at start (its oldest event, the dead-letter count).
    init(
        client: HECClient,
        outbox: any SplunkOutbox,
        spool: SplunkSpool?,
        envelope: SplunkEnvelope,
        tuning: Tuning,
        initial: OutboxCounts = OutboxCounts(),
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
        control.withLock { control in
            control.status.deadLettered = initial.deadLettered
            control.oldest = initial.oldest
        }
    }

    public var status: Status {
        let now = clock.now()
        return control.withLock { control in
            var status = control.status
            status.oldestPendingAge = control.oldest.map { max(0, now - $0) } ?? 0
            return status
        }
    }

    /// The shutdown signal arrived (the listeners are finishing their requests): the drain that follows must end
    /// before the grace period does.
    func shutdownBegan() {
        control.withLock { control in
            if control.shutdownBegan == nil { control.shutdownBegan = .now }
        }
    }

    /// Stops waiting for full batches and sends everything, until `drainLimit` after the signal (less a second, so
    /// that no batch is cut off by the group's own deadline).
    func beginDrain() {
        control.withLock { control in
            guard control.drainDeadline == nil else { return }
            let start = control.shutdownBegan ?? .now
            control.drainDeadline = max(.now, start + tuning.drainLimit - .seconds(1))
        }
        doorbell.ring()
    }

    private var drainDeadline: ContinuousClock.Instant? { control.withLock { $0.drainDeadline } }

    // MARK: The loop

    /// The loop's own state: what has been read, what waits to be sent again, and what Splunk took but the outbox
    /// has not yet been told.
    private struct Shipment {
        var outcome = Outcome()
        var cursor: Int64 = 0
        var readAhead: [PendingEvent] = []
        var retries: [Batch] = []
        var moreInOutbox = true
        var due = true
        var backoff: HECBackoff
        var resumeAt: ContinuousClock.Instant?
        var failures = 0
        /// Lowered by 413 answers.
        var maximumBytes: Int
        /// Events set aside since Splunk last accepted one.
        var setAsideRun = 0
        /// Delivered runs whose removal from the outbox failed, tried again each round.
        var unacknowledged: [ArraySlice<PendingEvent>] = []
        var unfiled: [(PendingEvent, String)] = []
        var readFailures = 0
        /// What the outbox was last told is settled (`advance`).
        var settledThrough: Int64 = 0

        var oldest: Double? {
            [retries.first?.events.first?.event.time, readAhead.first?.event.time].compactMap { $0 }.min()
        }
    }

    /// Ships until cancelled or, once draining, until nothing is left (or Splunk fails, or the drain deadline
    /// passes). `maximumFailures` ends it after that many failed attempts in a row, and at the first pause
    /// (`hec replay`: a command does not wait for an operator to fix a token).
    func ship(maximumFailures: Int? = nil) async -> Outcome {
        var run = Shipment(backoff: HECBackoff(first: tuning.firstRetry), maximumBytes: tuning.maximumBytes)

        while !Task.isCancelled {
            await settle(&run)
            await advance(&run)
            let deadline = drainDeadline
            if let deadline, ContinuousClock.now >= deadline { break }
            if let waitUntil = run.resumeAt, ContinuousClock.now < waitUntil {
                // Splunk is failing: a shutdown does not wait for it (what is left ships after the next start).
                if deadline != nil { break }
                await doorbell.wait(timeout: ContinuousClock.now.duration(to: waitUntil))
                continue
            }
            let capacity = run.resumeAt == nil ? tuning.inFlight : 1
            if run.readAhead.count < tuning.maximumEvents * capacity, run.moreInOutbox || run.due || deadline != nil {
                guard await read(&run, capacity: capacity) else { continue }
            }
            var batches: [Batch] = []
            while batches.count < capacity, !run.retries.isEmpty { batches.append(run.retries.removeFirst()) }
            while batches.count < capacity, !run.readAhead.isEmpty {
                let (count, payload) = HECBatch.take(
                    run.readAhead[...],
                    envelope: envelope,
                    maximumEvents: tuning.maximumEvents,
                    maximumBytes: run.maximumBytes
                )
                batches.append(Batch(events: Array(run.readAhead.prefix(count)), payload: payload))
                run.readAhead.removeFirst(count)
            }
            if batches.isEmpty {
                noteOldest(nil)
                tuning.observe?(status)
                if deadline != nil || maximumFailures != nil { break }
                await doorbell.wait(timeout: tuning.flushInterval)
                run.due = true
                continue
            }

            var failed: (reason: String, paused: Bool)?
            var answered = false
            for (batch, verdict, duration) in await send(batches) {
                metrics?.splunkBatch(outcome: verdict.label, duration: duration)
                switch verdict {
                case .delivered:
                    answered = true
                    await acknowledge(batch.events[...], in: &run)
                case .retry(let reason), .paused(let reason):
                    run.retries.append(batch)
                    metrics?.splunkRetried(batch.events.count)
                    let paused = if case .paused = verdict { true } else { false }
                    if failed == nil || paused { failed = (reason, paused) }
                case .tooLarge:
                    answered = true
                    // This Splunk takes less than SPLUNK_BATCH_MAX_BYTES: stay under what it refused from now on.
                    run.maximumBytes = max(1, min(run.maximumBytes, batch.payload.count / 2))
                    await split(batch, answer: "413 Content too large", in: &run)
                case .malformed(let answer):
                    answered = true
                    await split(batch, answer: answer, in: &run)
                case .rejected(let number, let answer):
                    answered = true
                    guard number < batch.events.count else {
                        await split(batch, answer: answer, in: &run)
                        continue
                    }
                    await acknowledge(batch.events[..<number], in: &run)
                    let rest = Array(batch.events[(number + 1)...])
                    if !rest.isEmpty { run.retries.append(self.batch(rest)) }
                    if run.setAsideRun >= tuning.setAsideRunLimit {
                        // Refused again and again with nothing accepted: not a bad event but a fault.
                        run.retries.append(self.batch([batch.events[number]]))
                        failed = (
                            "Splunk refused \(run.setAsideRun) events in a row as malformed (\(answer.prefix(200))); "
                                + "delivery is paused rather than setting everything aside: check proxies and "
                                + "SPLUNK_HEC_GZIP",
                            true
                        )
                    } else {
                        await setAside(batch.events[number], answer: answer, in: &run)
                    }
                }
            }
            run.retries.sort { $0.events[0].id < $1.events[0].id }
            noteOldest(run.oldest)
            await advance(&run)

            if let (reason, paused) = failed {
                run.failures += 1
                let wait = paused ? tuning.pauseInterval : run.backoff.next(unit: Double.random(in: 0..<1))
                run.resumeAt = .now + wait
                noteFailure(reason, paused: paused, firstInARun: run.failures == 1, retryIn: wait)
                tuning.observe?(status)
                if let maximumFailures, paused || run.failures >= maximumFailures {
                    run.outcome.failure = reason
                    break
                }
            } else {
                if answered {
                    if run.resumeAt != nil {
                        logger.notice("Splunk accepts events again", metadata: ["after_failures": "\(run.failures)"])
                    }
                    run.resumeAt = nil
                    run.failures = 0
                    run.backoff.reset()
                    control.withLock { $0.status.paused = nil }
                }
                tuning.observe?(status)
            }
        }
        await settle(&run)
        await advance(&run)
        return run.outcome
    }

    /// Reads more of the outbox. `false` after a failure (it waited; the loop starts again).
    private func read(_ run: inout Shipment, capacity: Int) async -> Bool {
        let unread = spool?.takeUnread() ?? 0
        do {
            let limit = tuning.maximumEvents * capacity - run.readAhead.count
            let read = try await outbox.pendingEvents(after: run.cursor, limit: limit)
            run.cursor = read.last?.id ?? run.cursor
            run.readAhead += read
            run.moreInOutbox = read.count == limit
            run.due = false
            run.readFailures = 0
            return true
        } catch {
            spool?.restore(unread)
            guard !Task.isCancelled else { return false }
            run.readFailures += 1
            let metadata: Logger.Metadata = ["error": "\(LedgerWriter.describe(error))"]
            if run.readFailures == 1 {
                logger.error("cannot read the Splunk outbox; trying again", metadata: metadata)
            } else {
                logger.debug("cannot read the Splunk outbox again", metadata: metadata)
            }
            let wait = min(HECBackoff.longest, tuning.firstRetry * (1 << min(run.readFailures - 1, 6)))
            try? await Task.sleep(for: wait)
            return false
        }
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

    /// A 413, or a batch malformed somewhere Splunk did not say: halves are sent again (no backoff: Splunk
    /// answered); a single event is set aside.
    private func split(_ batch: Batch, answer: String, in run: inout Shipment) async {
        guard batch.events.count > 1 else {
            await setAside(batch.events[0], answer: answer, in: &run)
            return
        }
        let half = batch.events.count / 2
        run.retries.append(self.batch(Array(batch.events[..<half])))
        run.retries.append(self.batch(Array(batch.events[half...])))
    }

    private func batch(_ events: [PendingEvent]) -> Batch {
        Batch(events: events, payload: HECBatch.payload(events, envelope: envelope))
    }

    /// Splunk has `events`: they leave the outbox (now, or in a later round if that fails).
    private func acknowledge(_ events: ArraySlice<PendingEvent>, in run: inout Shipment) async {
        guard !events.isEmpty else { return }
        run.setAsideRun = 0
        metrics?.splunkSent(events.count)
        run.outcome.sent += events.count
        let now = clock.now()
        control.withLock { control in
            control.status.sent += events.count
            control.status.lastSuccessAt = now
        }
        run.unacknowledged.append(events)
        await settle(&run)
    }

    private func setAside(_ event: PendingEvent, answer: String, in run: inout Shipment) async {
        let answer = String(answer.prefix(2_000))
        run.setAsideRun += 1
        metrics?.splunkDeadLettered()
        run.outcome.deadLettered += 1
        control.withLock { $0.status.deadLettered += 1 }
        logger.warning(
            "Splunk refused an event as malformed; it is set aside and not sent again",
            metadata: ["answer": "\(answer)", "outbox_id": "\(event.id)", "kind": "\(event.event.kind.rawValue)"]
        )
        run.unfiled.append((event, answer))
        await settle(&run)
    }

    /// Tells the outbox what Splunk took and what was set aside; what fails is kept and tried again next round, and
    /// its places in the spool are given back only once it is done.
    private func settle(_ run: inout Shipment) async {
        while let events = run.unacknowledged.first {
            do {
                try await outbox.delivered(events.first!.id...events.last!.id)
            } catch {
                logger.error(
                    "cannot remove delivered events from the Splunk outbox; trying again",
                    metadata: ["error": "\(LedgerWriter.describe(error))", "events": "\(events.count)"]
                )
                return
            }
            run.unacknowledged.removeFirst()
            let errors = events.count(where: { $0.event.kind == .error })
            spool?.release(usage: events.count - errors, errors: errors)
        }
        while let (event, answer) = run.unfiled.first {
            do {
                try await outbox.deadLetter(event, answer: answer, at: clock.now())
            } catch {
                logger.error(
                    "cannot move a refused event to the dead-letter table; trying again",
                    metadata: ["error": "\(LedgerWriter.describe(error))"]
                )
                return
            }
            run.unfiled.removeFirst()
            spool?.release(usage: event.event.kind == .usage ? 1 : 0, errors: event.event.kind == .error ? 1 : 0)
        }
    }

    /// Tells the outbox that everything up to the first event the shipper still holds (read ahead, to be sent again,
    /// or not yet acknowledged or set aside) is settled. Called between rounds, when no batch is on its way: Splunk
    /// may take a later batch while an earlier one waits for a retry, and a restart must send that one again.
    private func advance(_ run: inout Shipment) async {
        var held = run.cursor + 1
        func hold(_ events: some Sequence<PendingEvent>) {
            for event in events { held = min(held, event.id) }
        }
        hold(run.readAhead.prefix(1))
        for batch in run.retries { hold(batch.events) }
        for events in run.unacknowledged { hold(events) }
        hold(run.unfiled.lazy.map(\.0))
        let through = held - 1
        guard through > run.settledThrough else { return }
        do {
            try await outbox.settled(through: through)
            run.settledThrough = through
        } catch {
            logger.error(
                "cannot record how far Splunk has the request log's usage events; trying again",
                metadata: ["error": "\(LedgerWriter.describe(error))"]
            )
        }
    }

    private func noteFailure(_ reason: String, paused: Bool, firstInARun: Bool, retryIn wait: Duration) {
        let now = clock.now()
        let changed = control.withLock { control -> Bool in
            let changed = control.status.lastError != reason || firstInARun
            control.status.lastError = reason
            control.status.lastErrorAt = now
            control.status.paused = paused ? reason : nil
            return changed
        }
        let metadata: Logger.Metadata = [
            "reason": "\(reason)", "pending": "\(spool?.counts.pending ?? 0)", "retry_in_ms": "\(wait.milliseconds)",
        ]
        if paused, changed {
            logger.error("Splunk delivery paused; events are kept", metadata: metadata)
        } else if changed {
            logger.warning("Splunk delivery failed; events are kept and retried", metadata: metadata)
        } else {
            logger.debug("Splunk delivery failed again", metadata: metadata)
        }
    }

    /// Records the oldest event waiting (`nil`: none the shipper holds) and updates the gauges.
    private func noteOldest(_ oldest: Double?) {
        control.withLock { $0.oldest = oldest }
        guard let spool, let metrics else { return }
        metrics.splunkPending(spool.counts, oldestAge: status.oldestPendingAge)
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

    /// A service that only notes when shutdown begins: placed after the listeners, it hears the signal first, so the
    /// shipper (which drains last) knows how much of the grace period is left.
    struct ShutdownWatch: Service {
        let shipper: HECShipper

        func run() async throws {
            try? await gracefulShutdown()
            shipper.shutdownBegan()
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
