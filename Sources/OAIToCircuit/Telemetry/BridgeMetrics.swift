import CoreMetrics
import Prometheus
import Synchronization

/// The bridge's Prometheus metrics, made through swift-metrics with an injected factory (never the global one).
/// Model labels are bounded: a configured model keeps its name, anything else is `other`.
public final class BridgeMetrics: Sendable {
    /// The registry `/metrics` renders.
    public let registry: PrometheusCollectorRegistry
    private let factory: PrometheusMetricsFactory
    private let knownModels: Set<String>
    let tokenRefreshes: CoreMetrics.Counter
    let tokenRefreshFailures: CoreMetrics.Counter
    private let counters = Mutex<[InstrumentKey: CoreMetrics.Counter]>([:])
    private let timers = Mutex<[InstrumentKey: CoreMetrics.Timer]>([:])
    private let gauges = Mutex<[InstrumentKey: CoreMetrics.Gauge]>([:])

    public init(models: [String], registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
            .seconds(30), .seconds(60), .seconds(120), .seconds(300),
        ]
        // A ledger commit takes well under a millisecond when all is well.
        factory.durationHistogramBuckets["oai_to_circuit_ledger_commit_duration_seconds"] = [
            .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .microseconds(2500),
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(100), .seconds(1), .seconds(5),
        ]
        self.factory = factory
        self.knownModels = Set(models)
        self.tokenRefreshes = CoreMetrics.Counter(label: "oai_to_circuit_token_refreshes_total", factory: factory)
        self.tokenRefreshFailures = CoreMetrics.Counter(label: "oai_to_circuit_token_refresh_failures_total", factory: factory)
    }

    /// `model` if configured, `none` when the request named none, else `other`.
    func modelLabel(_ model: String?) -> String {
        guard let model else { return "none" }
        return knownModels.contains(model) ? model : "other"
    }

    /// One finished request: counted by route, status and model; its whole duration observed by route.
    func requestFinished(route: String, status: Int, model: String?, duration: Duration) {
        counter(
            "oai_to_circuit_requests_total",
            InstrumentKey("route", route, "status", Self.statusLabel(status), "model", modelLabel(model))
        ).increment()
        timer("oai_to_circuit_request_duration_seconds", InstrumentKey("route", route)).record(duration: duration)
    }

    /// Time from sending a request to Circuit to having its answer: whole, or a stream's head.
    func upstreamResponded(model: String, after duration: Duration) {
        timer("oai_to_circuit_upstream_duration_seconds", InstrumentKey("model", modelLabel(model))).record(duration: duration)
    }

    func tokensUsed(model: String, usage: Usage) {
        let label = modelLabel(model)
        if usage.promptTokens > 0 {
            counter("oai_to_circuit_tokens_total", InstrumentKey("model", label, "kind", "prompt")).increment(
                by: usage.promptTokens
            )
        }
        if usage.completionTokens > 0 {
            counter("oai_to_circuit_tokens_total", InstrumentKey("model", label, "kind", "completion"))
                .increment(by: usage.completionTokens)
        }
    }

    /// One ledger transaction holding `records` answered requests.
    func ledgerCommitted(records: Int, duration: Duration) {
        counter("oai_to_circuit_ledger_records_total", InstrumentKey()).increment(by: records)
        timer("oai_to_circuit_ledger_commit_duration_seconds", InstrumentKey()).record(duration: duration)
    }

    func ledgerFailed() {
        counter("oai_to_circuit_ledger_commit_failures_total", InstrumentKey()).increment()
    }

    /// A request the policy refused (`model_not_allowed`, `quota_exceeded`, `unauthorized_subkey`).
    func refused(code: String) {
        counter("oai_to_circuit_refusals_total", InstrumentKey("code", code)).increment()
    }

    // MARK: Splunk delivery

    /// Events committed to the outbox.
    func splunkQueued(usage: Int, errors: Int) {
        if errors > 0 {
            counter("oai_to_circuit_splunk_events_queued_total", InstrumentKey("kind", "error")).increment(by: errors)
        }
        if usage > 0 {
            counter("oai_to_circuit_splunk_events_queued_total", InstrumentKey("kind", "usage")).increment(by: usage)
        }
    }

    /// An event the spool had no place for.
    func splunkDropped(kind: OutboxEvent.Kind) {
        counter("oai_to_circuit_splunk_events_dropped_total", InstrumentKey("kind", kind.rawValue)).increment()
    }

    func splunkSent(_ count: Int) {
        counter("oai_to_circuit_splunk_events_sent_total", InstrumentKey()).increment(by: count)
    }

    /// Events of a batch that will be sent again (Splunk down, busy, or refusing the token).
    func splunkRetried(_ count: Int) {
        counter("oai_to_circuit_splunk_events_retried_total", InstrumentKey()).increment(by: count)
    }

    func splunkDeadLettered() {
        counter("oai_to_circuit_splunk_events_dead_lettered_total", InstrumentKey()).increment()
    }

    /// One HEC request, by outcome (`delivered`, `retry`, `paused`, `too_large`, `rejected`).
    func splunkBatch(outcome: String, duration: Duration) {
        timer("oai_to_circuit_splunk_batch_duration_seconds", InstrumentKey("outcome", outcome)).record(duration: duration)
    }

    /// Events waiting in the outbox, and the age of the oldest the shipper holds.
    func splunkPending(_ counts: SplunkSpool.Counts, oldestAge: Double) {
        gauge("oai_to_circuit_splunk_pending_events", InstrumentKey("kind", "usage")).record(counts.pendingUsage)
        gauge("oai_to_circuit_splunk_pending_events", InstrumentKey("kind", "error")).record(counts.pendingErrors)
        gauge("oai_to_circuit_splunk_oldest_pending_seconds", InstrumentKey()).record(oldestAge)
    }

    private func gauge(_ label: String, _ key: InstrumentKey) -> CoreMetrics.Gauge {
        Self.cached(gauges, label, key) { CoreMetrics.Gauge(label: label, dimensions: key.dimensions, factory: factory) }
    }

    private func counter(_ label: String, _ key: InstrumentKey) -> CoreMetrics.Counter {
        Self.cached(counters, label, key) { CoreMetrics.Counter(label: label, dimensions: key.dimensions, factory: factory) }
    }

    private func timer(_ label: String, _ key: InstrumentKey) -> CoreMetrics.Timer {
        Self.cached(timers, label, key) { CoreMetrics.Timer(label: label, dimensions: key.dimensions, factory: factory) }
    }

    /// Instruments are cached so the request path does not rebuild them (the set is bounded by the labels).
    private static func cached<Instrument>(
        _ cache: borrowing Mutex<[InstrumentKey: Instrument]>,
        _ label: String,
        _ key: InstrumentKey,
        make: () -> Instrument
    ) -> Instrument {
        var key = key
        key.label = label
        return cache.withLock { cache in
            if let existing = cache[key] { return existing }
            let made = make()
            cache[key] = made
            return made
        }
    }

    /// Statuses as labels, without formatting a number for the common ones.
    private static func statusLabel(_ status: Int) -> String {
        switch status {
        case 200: "200"
        case 400: "400"
        case 401: "401"
        case 403: "403"
        case 404: "404"
        case 429: "429"
        case 502: "502"
        case 504: "504"
        default: String(status)
        }
    }
}

/// An instrument's label and up to three dimensions, as a cache key (no array or string built per lookup).
private struct InstrumentKey: Hashable {
    var label = ""
    private var name1 = ""
    private var value1 = ""
    private var name2 = ""
    private var value2 = ""
    private var name3 = ""
    private var value3 = ""

    init() {}

    init(
        _ name1: String,
        _ value1: String,
        _ name2: String = "",
        _ value2: String = "",
        _ name3: String = "",
        _ value3: String = ""
    ) {
        self.name1 = name1
        self.value1 = value1
        self.name2 = name2
        self.value2 = value2
        self.name3 = name3
        self.value3 = value3
    }

    var dimensions: [(String, String)] {
        [(name1, value1), (name2, value2), (name3, value3)].filter { !$0.0.isEmpty }
    }
}

extension CoreMetrics.Timer {
    func record(duration: Duration) {
        let (seconds, attoseconds) = duration.components
        recordNanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }
}
