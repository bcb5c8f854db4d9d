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
    static func of(ledger: LedgerWriter.Health, location: String, policy: PolicyReloader.Status) -> HealthReport {
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

        return HealthReport(
            isHealthy: ledger.isHealthy,
            fields: [
                ("database", String(decoding: database.finish(), as: UTF8.self)),
                ("quotas", String(decoding: quotas.finish(), as: UTF8.self)),
            ]
        )
    }
}
