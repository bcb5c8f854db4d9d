import NIOCore
import Testing

@testable import OAIToCircuit

/// The delivery rules of the Splunk issue, as plain values: what each answer of Splunk means, backoff, batch size.
@Suite struct HECDeliveryTests {
    func verdict(_ status: Int, _ body: String?) -> HECVerdict {
        HECVerdict.of(status: status, body: body.map { ByteBuffer(string: $0) })
    }

    @Test func answersMapToWhatTheShipperDoes() {
        #expect(verdict(200, #"{"text": "Success", "code": 0}"#) == .delivered)
        #expect(verdict(503, #"{"text": "Server is busy", "code": 9}"#) == .retry(reason: "Splunk answered 503 (code 9)"))
        #expect(verdict(429, nil) == .retry(reason: "Splunk answered 429"))
        #expect(verdict(408, "") == .retry(reason: "Splunk answered 408"))
        #expect(verdict(413, nil) == .tooLarge)
        guard case .paused(let token) = verdict(403, #"{"text": "Invalid token", "code": 4}"#) else {
            Issue.record("403 must pause")
            return
        }
        #expect(token.contains("SPLUNK_HEC_TOKEN") && token.contains("code 4"))
        guard case .paused = verdict(401, #"{"text": "Token is required", "code": 2}"#) else {
            Issue.record("401 must pause")
            return
        }
        guard case .paused(let index) = verdict(400, #"{"text": "Incorrect index", "code": 7, "invalid-event-number": 0}"#)
        else {
            Issue.record("code 7 must pause")
            return
        }
        #expect(index.contains("SPLUNK_INDEX"))
        guard case .paused(let path) = verdict(404, nil) else {
            Issue.record("404 must pause")
            return
        }
        #expect(path.contains("/services/collector/event"))
        let bad = #"{"text": "Invalid data format", "code": 6, "invalid-event-number": 3}"#
        #expect(verdict(400, bad) == .rejected(eventNumber: 3, answer: bad))
        let unnamed = #"{"text": "Event field is required", "code": 12}"#
        #expect(verdict(400, unnamed) == .malformed(answer: unnamed))
        let negative = #"{"text": "Invalid data format", "code": 6, "invalid-event-number": -1}"#
        #expect(verdict(400, negative) == .malformed(answer: negative))
        // Only Splunk's per-event codes set events aside; any other 400 is a fault to fix, and everything is kept.
        for body in [#"{"text": "No data", "code": 5}"#, "not json", "<html>Bad Request</html>", #"{"code": 16}"#] {
            guard case .paused = verdict(400, body) else {
                Issue.record("400 \(body) must pause")
                continue
            }
        }
        guard case .paused(let noData) = verdict(400, #"{"text": "No data", "code": 5}"#) else { return }
        #expect(noData.contains("SPLUNK_HEC_GZIP"))
        guard case .paused(let channel) = verdict(400, #"{"text": "Data channel is missing", "code": 10}"#) else {
            Issue.record("code 10 must pause")
            return
        }
        #expect(channel.contains("SPLUNK_HEC_CHANNEL"))
    }

    @Test func backoffDoublesFromOneSecondToAMinuteWithJitter() {
        var backoff = HECBackoff()
        let steps = (0..<9).map { _ in backoff.next(unit: 0) }
        #expect(steps.map { Int(($0 / .seconds(1)).rounded()) } == [1, 2, 4, 8, 16, 32, 60, 60, 60])
        backoff.reset()
        #expect(backoff.next(unit: 0.999_999) < .milliseconds(1501))
        #expect(backoff.next(unit: 0.5) == .milliseconds(2500))
        for _ in 0..<5 { _ = backoff.next(unit: 0.999_999) }
        #expect(backoff.next(unit: 0.999_999) == .seconds(60))
        var quick = HECBackoff(first: .milliseconds(50))
        #expect(quick.next(unit: 0) == .milliseconds(50))
    }

    @Test func batchesStopAtTheEventOrByteLimit() {
        let envelope = SplunkEnvelope(host: "h", source: "s", sourcetype: "t", index: "main")
        func events(_ count: Int, bodyBytes: Int) -> ArraySlice<PendingEvent> {
            let body = Array(#"{"x":""#.utf8) + Array(repeating: UInt8(ascii: "a"), count: bodyBytes) + Array(#""}"#.utf8)
            return ArraySlice(
                (0..<count).map { PendingEvent(id: Int64($0 + 1), event: OutboxEvent(kind: .usage, time: 1, body: body)) }
            )
        }
        let one = envelope.wrap(events(1, bodyBytes: 300)[0].event).count
        let three = HECBatch.take(events(3, bodyBytes: 300), envelope: envelope, maximumEvents: 500, maximumBytes: 1 << 20)
        #expect(three.count == 3 && three.payload.count == 3 * one)
        #expect(String(decoding: three.payload, as: UTF8.self).components(separatedBy: "}{").count == 3)
        #expect(
            HECBatch.take(events(600, bodyBytes: 1), envelope: envelope, maximumEvents: 500, maximumBytes: 1 << 20).count
                == 500
        )
        let two = HECBatch.take(events(3, bodyBytes: 300), envelope: envelope, maximumEvents: 500, maximumBytes: 2 * one + 10)
        #expect(two.count == 2 && two.payload.count == 2 * one)
        let alone = HECBatch.take(events(2, bodyBytes: 5000), envelope: envelope, maximumEvents: 500, maximumBytes: 1000)
        #expect(alone.count == 1)
        let none = HECBatch.take([], envelope: envelope, maximumEvents: 500, maximumBytes: 1000)
        #expect(none.count == 0 && none.payload.isEmpty)
    }
}
