import AsyncHTTPClient
import Logging
import NIOCore
import NIOSSL

/// `oai-to-circuit hec test`: one test event, Splunk's answer, and what it means.
public enum HECProbe {
    public struct Report: Sendable {
        public var delivered: Bool
        public var text: String
    }

    /// Sends a test event (sourcetype `SPLUNK_SOURCETYPE:test`, which dashboards leave out) the way the shipper
    /// sends batches, and explains the answer.
    public static func run(_ settings: BridgeConfiguration.Splunk, now: Double) async -> Report {
        guard let client = HECClient(settings) else {
            return Report(delivered: false, text: "Splunk HEC is off: set both SPLUNK_HEC_URL and SPLUNK_HEC_TOKEN\n")
        }
        let report = await probe(client, settings: settings, now: now)
        await client.shutdown()
        return report
    }

    private static func probe(_ client: HECClient, settings: BridgeConfiguration.Splunk, now: Double) async -> Report {
        let envelope = SplunkEnvelope(
            host: SplunkEnvelope.hostName,
            source: settings.source,
            sourcetype: settings.sourcetype + ":test",
            index: settings.index
        )
        var body = JSONObjectWriter(compact: true)
        body.string("event_type", "test")
        body.string("message", "oai-to-circuit hec test")
        body.string("timestamp", PeriodCalendar.timestamp(now))
        body.string("version", BridgeVersion.current)
        let payload = envelope.wrap(OutboxEvent(kind: .usage, time: now, body: body.finish()))
        var text = "POST \(client.url) (index \(settings.index), sourcetype \(envelope.sourcetype)"
        text += settings.gzip ? ", gzip" : ""
        text += settings.verifyTLS ? "" : ", certificate not checked"
        text += ")\n"
        do {
            let (status, answer) = try await client.post(payload)
            let answerText = String(buffer: answer)
            text += "Splunk answered \(status): \(answerText.isEmpty ? "(no body)" : answerText)\n"
            let delivered = (200..<300).contains(status)
            text += "\(delivered ? "ok" : "problem"): " + diagnosis(status: status, answer: answer, settings: settings) + "\n"
            return Report(delivered: delivered, text: text)
        } catch {
            text += "no answer: \(HECClient.describe(error))\n"
            text += "problem: " + diagnosis(error: error, settings: settings) + "\n"
            return Report(delivered: false, text: text)
        }
    }

    /// What Splunk's answer says about the configuration.
    static func diagnosis(status: Int, answer: ByteBuffer, settings: BridgeConfiguration.Splunk) -> String {
        let (code, _) = HECVerdict.fields(of: answer)
        switch (status, code) {
        case (200..<300, _):
            return "Splunk indexed the test event; search for it with index=\(settings.index) "
                + "sourcetype=\"\(settings.sourcetype):test\""
        case (_, 1?):
            return "the token is disabled, or HEC is disabled for all tokens: enable them in Splunk (Settings > Data inputs "
                + "> HTTP Event Collector, and its Global Settings)"
        case (_, 2?), (_, 3?):
            return "Splunk did not accept the Authorization header: check that SPLUNK_HEC_TOKEN holds only the token"
        case (401, _), (403, _), (_, 4?):
            return "bad token: Splunk does not know SPLUNK_HEC_TOKEN (copy it from Settings > Data inputs > HTTP Event "
                + "Collector)"
        case (_, 7?):
            return "the token may not write to index \(settings.index): set SPLUNK_INDEX to one of the token's allowed "
                + "indexes, or allow it"
        case (_, 10?), (_, 11?):
            return "the token has indexer acknowledgement on, which needs a channel: set SPLUNK_HEC_CHANNEL to a GUID"
        case (404, _):
            return "wrong URL or path: SPLUNK_HEC_URL should be https://HOST:8088 or end in /services/collector/event "
                + "(and name HEC's port, not Splunk Web's)"
        case (413, _):
            return "Splunk refused even one small event as too large: check its max_content_length"
        case (400, _):
            return "Splunk refused the event as malformed (see its answer)"
        case (503, _), (_, 9?), (_, 18?), (_, 19?), (_, 20?):
            return "Splunk is busy or unhealthy (its queues are full): the bridge keeps events and retries"
        case (500..<600, _):
            return "Splunk failed on its side: the bridge keeps events and retries"
        default:
            return "an answer Splunk's HEC does not give: is SPLUNK_HEC_URL pointing at HEC (port 8088 by default)?"
        }
    }

    /// What a transport failure says about the configuration.
    static func diagnosis(error: any Error, settings: BridgeConfiguration.Splunk) -> String {
        let secure = settings.eventURL?.lowercased().hasPrefix("https://") == true
        let description = HECClient.describe(error)
        if description.hasPrefix("TLS failed") {
            return "TLS failure: if Splunk's certificate is self-signed, trust its CA or set SPLUNK_VERIFY_SSL=false; if "
                + "HEC has SSL turned off, use http:// in SPLUNK_HEC_URL"
        }
        if let error = error as? HTTPClientError, error == .remoteConnectionClosed {
            return secure
                ? "Splunk closed the connection: check the host and port of SPLUNK_HEC_URL"
                : "Splunk closed the connection: HEC uses SSL by default, so SPLUNK_HEC_URL should start with https://"
        }
        if description.contains("in time") || description.contains("did not answer") {
            return "no answer in time: check the host, the port and firewalls, or raise SPLUNK_HEC_TIMEOUT_SECONDS"
        }
        if description.contains("refused") || description.contains("could not connect") {
            return "nothing accepts connections there: is HEC enabled (Settings > Data inputs > HTTP Event Collector > "
                + "Global Settings) and is the port right (8088 by default)?"
        }
        return "cannot reach Splunk (\(description)): check SPLUNK_HEC_URL"
    }
}

/// `oai-to-circuit hec replay`: the usage events of a span of the request log, rebuilt (`backfill: true`, their
/// original `time`) and sent again through the shipper's loop.
public enum HECReplay {
    /// The request log as an outbox: read in pages, nothing to acknowledge (the log is only read).
    struct RequestLogOutbox: SplunkOutbox {
        let ledger: SQLiteLedger
        let since: Double
        let until: Double

        func pendingEvents(after id: Int64, limit: Int) async throws -> [PendingEvent] {
            try await ledger.requestLog(after: id, since: since, until: until, limit: limit).map {
                PendingEvent(id: $0.id, event: SplunkEvent.usageEvent($0.entry, backfill: true))
            }
        }

        func delivered(_ ids: ClosedRange<Int64>) async throws {}
        func settled(through id: Int64) async throws {}
        func deadLetter(_ event: PendingEvent, answer: String, at time: Double) async throws {}
        func outboxCounts() async throws -> OutboxCounts { OutboxCounts() }
    }

    /// Sends the request log's entries finished in `[since, until)` (seconds since 1970). Stops at the first
    /// configuration problem or after `maximumFailures` failed attempts in a row.
    public static func run(
        _ settings: BridgeConfiguration.Splunk,
        ledger: SQLiteLedger,
        since: Double,
        until: Double,
        maximumFailures: Int = 5,
        logger: Logger
    ) async -> HECShipper.Outcome {
        guard let client = HECClient(settings) else {
            return HECShipper.Outcome(failure: "Splunk HEC is off: set both SPLUNK_HEC_URL and SPLUNK_HEC_TOKEN")
        }
        let shipper = HECShipper(
            client: client,
            outbox: RequestLogOutbox(ledger: ledger, since: since, until: until),
            spool: nil,
            envelope: SplunkEnvelope(settings),
            tuning: HECShipper.Tuning(settings, drainLimit: .zero),
            metrics: nil,
            logger: logger
        )
        let outcome = await shipper.ship(maximumFailures: maximumFailures)
        await client.shutdown()
        return outcome
    }
}
