import NIOCore

/// What the shipper does after one HEC request (issue 4 delivery rules), decided from Splunk's answer alone so the
/// rules can be tested as plain values, apart from any I/O.
enum HECVerdict: Equatable, Sendable {
    /// Every event of the batch was indexed.
    case delivered
    /// Try the same batch again after a backoff: a transport error, a timeout, 5xx, 429 or 408.
    case retry(reason: String)
    /// A configuration problem (bad token, unknown index, wrong URL): keep everything and retry slowly, saying why
    /// in `/health` and the log.
    case paused(reason: String)
    /// 413: the batch is too large for this Splunk; send it in halves (a single event that is still too large is
    /// set aside).
    case tooLarge
    /// 400 naming one event: those before it were indexed, it is set aside with Splunk's answer, the rest are sent
    /// again.
    case rejected(eventNumber: Int, answer: String)
    /// 400 with a per-event code but naming no event: something in the batch is malformed; halve the batch until
    /// the event is found.
    case malformed(answer: String)

    /// Splunk's codes for one bad event (invalid data format, event field missing or blank, bad indexed fields):
    /// only these set an event aside. Any other 400 is taken as a fault to fix, not an event to drop.
    static let perEventCodes: Set<Int> = [6, 12, 13, 15]

    /// Classifies Splunk's answer (`nil` body when there was none).
    static func of(status: Int, body: ByteBuffer?) -> HECVerdict {
        let answer = body.map { String(buffer: $0) } ?? ""
        let (code, eventNumber) = Self.fields(of: body)
        switch status {
        case 200..<300:
            return .delivered
        case 401, 403:
            return .paused(
                reason: "Splunk refused the HEC token (\(status)\(code.map { ", code \($0)" } ?? "")): check SPLUNK_HEC_TOKEN"
            )
        case 404:
            return .paused(reason: "Splunk answered 404: check the path of SPLUNK_HEC_URL (/services/collector/event)")
        case 400 where code == 7:
            return .paused(reason: "Splunk does not know the index (code 7): check SPLUNK_INDEX and the token's allowed indexes")
        case 400 where code == 10 || code == 11:
            return .paused(
                reason:
                    "Splunk wants a data channel (code \(code ?? 10)): the token has indexer acknowledgement on; set SPLUNK_HEC_CHANNEL to a GUID"
            )
        case 400 where code == 5:
            return .paused(
                reason:
                    "Splunk found no data in the request (code 5): something between may change the body; try SPLUNK_HEC_GZIP=false"
            )
        case 400:
            guard let code, perEventCodes.contains(code) else {
                return .paused(
                    reason: "Splunk answered 400 \(code.map { "(code \($0))" } ?? "with an answer that is not Splunk's"): "
                        + "check SPLUNK_HEC_URL and any proxy in between"
                )
            }
            if let eventNumber, eventNumber >= 0 { return .rejected(eventNumber: eventNumber, answer: answer) }
            return .malformed(answer: answer)
        case 413:
            return .tooLarge
        case 408, 429, 500..<600:
            return .retry(reason: "Splunk answered \(status)\(code.map { " (code \($0))" } ?? "")")
        default:
            return .retry(reason: "Splunk answered \(status)")
        }
    }

    /// `code` and `invalid-event-number` from Splunk's JSON answer, when present.
    static func fields(of body: ByteBuffer?) -> (code: Int?, eventNumber: Int?) {
        guard let body else { return (nil, nil) }
        let bytes = Array(body.readableBytesView)
        guard case .object(let members)? = try? JSONValue.parse(bytes) else { return (nil, nil) }
        var code: Int?
        var eventNumber: Int?
        for member in members {
            if member.key == "code", let value = member.value.integer { code = Int(value) }
            if member.key == "invalid-event-number", let value = member.value.integer { eventNumber = Int(value) }
        }
        return (code, eventNumber)
    }
}

/// Exponential backoff with jitter: 1 s doubling to 60 s, each wait drawn between its step and half as much again
/// (never above 60 s), so that several bridges do not retry in step.
struct HECBackoff: Sendable {
    static let longest: Duration = .seconds(60)
    let first: Duration
    private(set) var failures = 0

    init(first: Duration = .seconds(1)) { self.first = first }

    /// The wait before the next attempt, counting one more failure. `unit` is a random number in [0, 1).
    mutating func next(unit: Double) -> Duration {
        let step = min(Self.longest, first * (1 << min(failures, 6)))
        failures += 1
        return min(Self.longest, step * (1 + 0.5 * unit))
    }

    mutating func reset() { failures = 0 }
}

/// One HEC request's worth of events (`SPLUNK_BATCH_MAX_EVENTS`, `SPLUNK_BATCH_MAX_BYTES`).
enum HECBatch {
    /// How many of the oldest pending `events` go in the next batch, and the batch itself (their HEC events,
    /// concatenated): up to `maximumEvents`, and no more than `maximumBytes` once the first is in (an event larger
    /// than the limit goes alone).
    static func take(
        _ events: ArraySlice<PendingEvent>,
        envelope: SplunkEnvelope,
        maximumEvents: Int,
        maximumBytes: Int
    ) -> (count: Int, payload: [UInt8]) {
        var payload: [UInt8] = []
        var count = 0
        for pending in events.prefix(maximumEvents) {
            let before = payload.count
            envelope.wrap(pending.event, into: &payload)
            if count > 0, payload.count > maximumBytes {
                payload.removeSubrange(before...)
                break
            }
            count += 1
        }
        return (count, payload)
    }

    /// The HEC events of `events`, concatenated.
    static func payload(_ events: [PendingEvent], envelope: SplunkEnvelope) -> [UInt8] {
        var payload: [UInt8] = []
        for pending in events { envelope.wrap(pending.event, into: &payload) }
        return payload
    }
}
