import Logging

/// Accounts every answered request: charges its tokens to the in-memory counters at once (so enforcement sees them
/// before the answer ends), then returns only when the ledger has committed it, with its Splunk usage event when
/// delivery is on. A refusal's error event is committed the same way (and only logged when delivery is off).
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
        var usage = usage
        let caller = enforcer.current(usage.caller)
        if caller.keyID != usage.caller.keyID { usage.admission.caller = caller }
        enforcer.charge(usage.admission, usage: usage.usage)
        await writer.commit(LedgerEntry(usage))
    }

    public func record(_ refusal: RefusalRecord) async {
        await LoggingUsageRecorder(logger: logger).record(refusal)
        guard writer.spool != nil else { return }
        await writer.commit(event: SplunkEvent.errorEvent(refusal))
    }
}
