import Logging

/// Accounts every answered request: charges its tokens to the in-memory counters at once (so enforcement sees them
/// before the answer ends), then returns only when the ledger has committed it.
public struct LedgerRecorder: UsageRecorder {
    let enforcer: QuotaEnforcer
    let writer: LedgerWriter
    let logger: Logger

    public init(enforcer: QuotaEnforcer, writer: LedgerWriter, logger: Logger) {
        self.enforcer = enforcer
        self.writer = writer
        self.logger = logger
    }

    public func record(_ usage: UsageRecord) async {
        enforcer.charge(usage.admission, usage: usage.usage)
        await writer.commit(LedgerEntry(usage))
    }

    /// Refusals are only logged for now; the Splunk error events will carry them.
    public func record(_ refusal: RefusalRecord) async {
        await LoggingUsageRecorder(logger: logger).record(refusal)
    }
}
