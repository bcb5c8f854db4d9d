/// What every HEC event carries besides its body (contract section 6): `host`, and `SPLUNK_SOURCE`,
/// `SPLUNK_SOURCETYPE` (error events add `:error`) and `SPLUNK_INDEX`.
public struct SplunkEnvelope: Sendable, Equatable {
    public var host: String
    public var source: String
    public var sourcetype: String
    public var index: String

    public init(host: String, source: String, sourcetype: String, index: String) {
        self.host = host
        self.source = source
        self.sourcetype = sourcetype
        self.index = index
    }
}

/// Splunk HEC events, each one JSON object ready to be concatenated into a batch. The subkey itself never appears:
/// only its hash, the key's id, and its name and email when known.
public enum SplunkEvent {
    /// The usage event of an answered request (contract section 6), from its ledger entry, so that the request log
    /// can rebuild it later (`backfill`, keeping its original time).
    public static func usage(_ entry: LedgerEntry, envelope: SplunkEnvelope, backfill: Bool = false) -> [UInt8] {
        var out = JSONObjectWriter()
        out.number("time", exact: epoch(entry.finishedAt))
        envelopeFields(envelope, sourcetype: envelope.sourcetype, into: &out)
        out.open("event")
        out.string("subkey", entry.subkeyHash)
        out.string("model", entry.model)
        out.number("requests", exact: "1")
        out.number("prompt_tokens", exact: String(entry.usage.promptTokens))
        out.number("completion_tokens", exact: String(entry.usage.completionTokens))
        out.number("total_tokens", exact: String(entry.usage.totalTokens))
        out.number("status_code", exact: String(entry.statusCode))
        out.bool("success", entry.statusCode < 400)
        out.string("timestamp", PeriodCalendar.timestamp(entry.finishedAt))
        out.bool("is_streaming", entry.isStreaming)
        out.string("request_id", entry.requestID)
        out.string("client_ip", entry.clientAddress)
        out.string("x_forwarded_for", entry.forwardedFor)
        out.string("key_id", entry.keyID)
        if let name = entry.friendlyName { out.string("friendly_name", name) }
        if let email = entry.email { out.string("email", email) }
        if entry.clientDisconnected { out.bool("client_disconnected", true) }
        if backfill { out.bool("backfill", true) }
        out.close()
        return out.finish()
    }

    /// The error event of an answer the bridge gave itself (401, 403, 429, 502, 504).
    public static func error(_ refusal: RefusalRecord, envelope: SplunkEnvelope) -> [UInt8] {
        var out = JSONObjectWriter()
        out.number("time", exact: epoch(refusal.finishedAt))
        envelopeFields(envelope, sourcetype: envelope.sourcetype + ":error", into: &out)
        out.open("event")
        out.string("event_type", "error")
        out.string("error_type", refusal.error.code)
        out.string("error_message", refusal.error.message)
        out.string("timestamp", PeriodCalendar.timestamp(refusal.finishedAt))
        out.string("request_id", refusal.requestID)
        out.string("client_ip", refusal.clientAddress)
        out.string("x_forwarded_for", refusal.forwardedFor)
        let caller = refusal.caller ?? .anonymous
        out.string("subkey", caller.subkeyHash)
        out.string("key_id", caller.keyID)
        if let model = refusal.model { out.string("model", model) }
        if let name = caller.friendlyName { out.string("friendly_name", name) }
        if let email = caller.email { out.string("email", email) }
        out.close()
        return out.finish()
    }

    private static func envelopeFields(_ envelope: SplunkEnvelope, sourcetype: String, into out: inout JSONObjectWriter) {
        out.string("host", envelope.host)
        out.string("source", envelope.source)
        out.string("sourcetype", sourcetype)
        out.string("index", envelope.index)
    }

    /// Epoch seconds with six decimals, written from whole microseconds so no float formatting can add noise.
    static func epoch(_ seconds: Double) -> String {
        let micros = Int64((seconds * 1_000_000).rounded())
        let whole = micros / 1_000_000
        let fraction = String(micros % 1_000_000)
        return "\(whole)." + String(repeating: "0", count: 6 - fraction.count) + fraction
    }
}
