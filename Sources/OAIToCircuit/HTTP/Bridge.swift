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
        var database: [UInt8] = Array(#"{"status": "#.utf8)
        database += Array((ledger.isHealthy ? #""ok""# : #""error""#).utf8)
        database += Array(#", "path": "#.utf8)
        JSONString.encode(location, into: &database)
        database += Array(#", "unwritten_records": \#(ledger.unwritten), "dropped_records": \#(ledger.droppedRecords)"#.utf8)
        database += Array(#", "last_error": "#.utf8)
        if let error = ledger.lastError { JSONString.encode(error, into: &database) } else { database += Array("null".utf8) }
        database.append(UInt8(ascii: "}"))

        var quotas: [UInt8] = Array(#"{"source": "#.utf8)
        JSONString.encode(policy.source, into: &quotas)
        quotas += Array(#", "file_exists": \#(policy.fileExists), "subkeys": \#(policy.subkeys), "loaded_at": "#.utf8)
        JSONString.encode(PeriodCalendar.timestamp(policy.loadedAt), into: &quotas)
        quotas += Array(#", "reload_error": "#.utf8)
        if let error = policy.error { JSONString.encode(error, into: &quotas) } else { quotas += Array("null".utf8) }
        quotas.append(UInt8(ascii: "}"))

        return HealthReport(
            isHealthy: ledger.isHealthy,
            fields: [
                ("database", String(decoding: database, as: UTF8.self)), ("quotas", String(decoding: quotas, as: UTF8.self)),
            ]
        )
    }
}
