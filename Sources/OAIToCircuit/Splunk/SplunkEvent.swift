#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What every HEC event carries besides its body (contract section 6): `host`, and `SPLUNK_SOURCE`,
/// `SPLUNK_SOURCETYPE` (error events add `:error`) and `SPLUNK_INDEX`.
public struct SplunkEnvelope: Sendable, Equatable {
    public let host: String
    public let source: String
    public let sourcetype: String
    public let index: String
    /// `,"host":…,"index":…,"event":` written once for each kind.
    let usagePrefix: [UInt8]
    let errorPrefix: [UInt8]
    var prefixSize: Int { max(usagePrefix.count, errorPrefix.count) }

    public init(host: String, source: String, sourcetype: String, index: String) {
        self.host = host
        self.source = source
        self.sourcetype = sourcetype
        self.index = index
        func prefix(_ sourcetype: String) -> [UInt8] {
            var bytes = Array(",".utf8)
            for (name, value) in [("host", host), ("source", source), ("sourcetype", sourcetype), ("index", index)] {
                JSONString.encode(name, into: &bytes)
                bytes.append(UInt8(ascii: ":"))
                JSONString.encode(value, into: &bytes)
                bytes.append(UInt8(ascii: ","))
            }
            bytes.append(contentsOf: #""event":"#.utf8)
            return bytes
        }
        self.usagePrefix = prefix(sourcetype)
        self.errorPrefix = prefix(sourcetype + ":error")
    }

    /// The envelope of this bridge: the machine's host name and the `SPLUNK_*` settings.
    public init(_ settings: BridgeConfiguration.Splunk) {
        self.init(host: Self.hostName, source: settings.source, sourcetype: settings.sourcetype, index: settings.index)
    }

    /// `gethostname(2)`, as the earlier bridge's `socket.gethostname()`.
    static var hostName: String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Splunk HEC events. The request path makes the `event` object (`usageEvent`, `errorEvent`) for the outbox; the
/// envelope is added when it is sent (`SplunkEnvelope.wrap`). The subkey itself never appears: only its hash, the
/// key's id, and its name and email when known.
public enum SplunkEvent {
    /// The usage event of an answered request (contract section 6), from its ledger entry, so that the request log
    /// can rebuild it later (`backfill`, keeping its original time).
    public static func usageEvent(_ entry: LedgerEntry, backfill: Bool = false) -> OutboxEvent {
        var out = JSONObjectWriter(compact: true)
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
        return OutboxEvent(kind: .usage, time: entry.finishedAt, body: out.finish())
    }

    /// The error event of an answer the bridge gave itself (401, 403, 429, 502, 504).
    public static func errorEvent(_ refusal: RefusalRecord) -> OutboxEvent {
        var out = JSONObjectWriter(compact: true)
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
        return OutboxEvent(kind: .error, time: refusal.finishedAt, body: out.finish())
    }

    /// Epoch seconds with six decimals, written from whole microseconds so no float formatting can add noise.
    static func epoch(_ seconds: Double) -> String {
        let micros = Int64((seconds * 1_000_000).rounded())
        let whole = micros / 1_000_000
        let fraction = String(micros % 1_000_000)
        return "\(whole)." + String(repeating: "0", count: 6 - fraction.count) + fraction
    }
}

extension SplunkEnvelope {
    /// `sourcetype` of events of `kind`: error events add `:error`.
    public func sourcetype(of kind: OutboxEvent.Kind) -> String {
        kind == .error ? sourcetype + ":error" : sourcetype
    }

    /// The HEC event: `time`, `host`, `source`, `sourcetype`, `index`, then the event object as it was stored.
    public func wrap(_ event: OutboxEvent) -> [UInt8] {
        var bytes: [UInt8] = []
        wrap(event, into: &bytes)
        return bytes
    }

    /// Appends the HEC event to `bytes` (a batch is these, concatenated).
    func wrap(_ event: OutboxEvent, into bytes: inout [UInt8]) {
        bytes.reserveCapacity(bytes.count + event.body.count + prefixSize + 48)
        bytes.append(contentsOf: #"{"time":"#.utf8)
        bytes.append(contentsOf: SplunkEvent.epoch(event.time).utf8)
        bytes.append(contentsOf: event.kind == .error ? errorPrefix : usagePrefix)
        bytes.append(contentsOf: event.body)
        bytes.append(UInt8(ascii: "}"))
    }
}
