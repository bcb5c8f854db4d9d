import Logging

/// Everything the HTTP routes need, assembled by `serve` (or by a test).
public struct Bridge: Sendable {
    public var configuration: BridgeConfiguration
    public var circuit: CircuitClient
    public var authorizer: any SubkeyAuthorizer
    public var policy: any AdmissionPolicy
    public var recorder: any UsageRecorder
    public var metrics: BridgeMetrics
    public var clock: BridgeClock
    public var logger: Logger
    /// Extra fields for `GET /health` (database, Splunk queue…), filled by later components.
    public var health: @Sendable () async -> HealthReport

    public init(
        configuration: BridgeConfiguration,
        circuit: CircuitClient,
        authorizer: any SubkeyAuthorizer = AcceptingAuthorizer(),
        policy: any AdmissionPolicy = UnlimitedPolicy(),
        recorder: any UsageRecorder,
        metrics: BridgeMetrics,
        clock: BridgeClock = .system,
        logger: Logger,
        health: @escaping @Sendable () async -> HealthReport = { HealthReport() }
    ) {
        self.configuration = configuration
        self.circuit = circuit
        self.authorizer = authorizer
        self.policy = policy
        self.recorder = recorder
        self.metrics = metrics
        self.clock = clock
        self.logger = logger
        self.health = health
    }
}

/// What components other than the core add to `GET /health`.
public struct HealthReport: Sendable {
    /// `false` turns the answer into 503 `unhealthy` (for example, the database is unusable).
    public var isHealthy = true
    /// Extra top-level members, as raw JSON values keyed by name.
    public var fields: [(String, String)] = []
    public init(isHealthy: Bool = true, fields: [(String, String)] = []) {
        self.isHealthy = isHealthy
        self.fields = fields
    }
}

extension HealthReport {
    /// `database` and `quotas` members: 503 when the ledger cannot commit; a rejected policy reload shows, but the
    /// bridge stays healthy (the previous policy is in force).
    static func of(
        ledger: LedgerWriter.Health,
        location: String,
        policy: PolicyReloader.Status,
        managedKeys: Int? = nil,
        splunk: (status: HECShipper.Status, spool: SplunkSpool.Counts)? = nil
    ) -> HealthReport {
        var database = JSONObjectWriter()
        database.string("status", ledger.isHealthy ? "ok" : "error")
        database.string("path", location)
        database.number("unwritten_records", exact: String(ledger.unwritten))
        database.number("dropped_records", exact: String(ledger.droppedRecords))
        database.string("last_error", ledger.lastError)

        var quotas = JSONObjectWriter()
        quotas.string("source", policy.source)
        quotas.bool("file_exists", policy.fileExists)
        quotas.number("subkeys", exact: String(policy.subkeys))
        quotas.string("loaded_at", PeriodCalendar.timestamp(policy.loadedAt))
        quotas.string("reload_error", policy.error)
        if let managedKeys { quotas.number("managed_keys", exact: String(managedKeys)) }

        // Splunk being down or refusing the token does not make the bridge unhealthy: events are kept.
        var hec = JSONObjectWriter()
        hec.bool("enabled", splunk != nil)
        if let (status, spool) = splunk {
            hec.number("pending", exact: String(spool.pending))
            hec.number("pending_usage", exact: String(spool.pendingUsage))
            hec.number("pending_errors", exact: String(spool.pendingErrors))
            hec.number("oldest_pending_seconds", exact: String(Int(status.oldestPendingAge.rounded(.down))))
            hec.number("sent", exact: String(status.sent))
            hec.number("dropped_usage", exact: String(spool.droppedUsage))
            hec.number("dropped_errors", exact: String(spool.droppedErrors))
            hec.number("dead_lettered", exact: String(status.deadLettered))
            hec.string("last_success", status.lastSuccessAt.map(PeriodCalendar.timestamp))
            hec.string("last_error", status.lastError)
            hec.string("last_error_at", status.lastErrorAt.map(PeriodCalendar.timestamp))
            hec.string("paused", status.paused)
        }

        return HealthReport(
            isHealthy: ledger.isHealthy,
            fields: [
                ("database", String(decoding: database.finish(), as: UTF8.self)),
                ("quotas", String(decoding: quotas.finish(), as: UTF8.self)),
                ("splunk_hec", String(decoding: hec.finish(), as: UTF8.self)),
            ]
        )
    }
}
