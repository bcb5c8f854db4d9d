import Foundation
import Testing

@testable import OAIToCircuit

/// Contract section 6: the usage and error events, field by field.
@Suite struct SplunkEventTests {
    let envelope = SplunkEnvelope(host: "bridge-1", source: "oai-to-circuit", sourcetype: "llm:usage", index: "main")

    func object(_ bytes: [UInt8]) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
    }

    func entry(subkey: String = "sk-secret-alice", disconnected: Bool = false, status: Int = 200) -> LedgerEntry {
        let caller = Caller(subkey: subkey, friendlyName: "Alice", email: "alice@example.com")
        return LedgerEntry(
            UsageRecord(
                requestID: "req-1",
                finishedAt: 1_795_945_845.123456,
                admission: Admission(caller: caller, model: "gpt-4o", admittedAt: 1_795_945_844),
                statusCode: status,
                usage: Usage(promptTokens: 11, completionTokens: 7),
                isStreaming: true,
                latency: .milliseconds(1200),
                clientDisconnected: disconnected,
                clientAddress: "10.0.0.5",
                forwardedFor: "203.0.113.9"
            )
        )
    }

    @Test func usageEventHasTheContractsFields() throws {
        let bytes = envelope.wrap(SplunkEvent.usageEvent(entry()))
        let text = String(decoding: bytes, as: UTF8.self)
        #expect(
            text.hasPrefix(
                #"{"time":1795945845.123456,"host":"bridge-1","source":"oai-to-circuit","sourcetype":"llm:usage","index":"main","event":{"#
            )
        )
        let event = try #require(try object(bytes)["event"] as? [String: Any])
        #expect(event["subkey"] as? String == Caller.hash("sk-secret-alice"))
        #expect(event["model"] as? String == "gpt-4o")
        #expect(event["requests"] as? Int == 1)
        #expect(
            event["prompt_tokens"] as? Int == 11 && event["completion_tokens"] as? Int == 7 && event["total_tokens"] as? Int == 18
        )
        #expect(event["status_code"] as? Int == 200 && event["success"] as? Bool == true)
        #expect(event["timestamp"] as? String == "2026-11-29T09:50:45.123456Z")
        #expect(event["is_streaming"] as? Bool == true)
        #expect(event["request_id"] as? String == "req-1")
        #expect(event["client_ip"] as? String == "10.0.0.5" && event["x_forwarded_for"] as? String == "203.0.113.9")
        #expect(event["key_id"] as? String == Caller.hash("sk-secret-alice"))
        #expect(event["friendly_name"] as? String == "Alice" && event["email"] as? String == "alice@example.com")
        #expect(event["client_disconnected"] == nil && event["backfill"] == nil)
        #expect(Set(event.keys).count == 16)
        #expect(!text.contains("sk-secret-alice"))
    }

    @Test func disconnectedFailedAndBackfilledUsageEvents() throws {
        let event = try #require(
            try object(envelope.wrap(SplunkEvent.usageEvent(entry(disconnected: true, status: 429), backfill: true)))["event"]
                as? [String: Any]
        )
        #expect(event["client_disconnected"] as? Bool == true && event["backfill"] as? Bool == true)
        #expect(event["success"] as? Bool == false && event["status_code"] as? Int == 429)
    }

    @Test func errorEventHasTheContractsFields() throws {
        let refusal = RefusalRecord(
            requestID: "req-2",
            finishedAt: 1_795_945_845.5,
            error: .quotaExceeded("requests", retryAfter: 60),
            caller: Caller(subkey: "sk-secret-bob"),
            model: "o3",
            clientAddress: "10.0.0.6",
            forwardedFor: ""
        )
        let bytes = envelope.wrap(SplunkEvent.errorEvent(refusal))
        let object = try object(bytes)
        #expect(object["sourcetype"] as? String == "llm:usage:error")
        #expect(object["time"] as? Double == 1_795_945_845.5)
        let event = try #require(object["event"] as? [String: Any])
        #expect(event["event_type"] as? String == "error")
        #expect(event["error_type"] as? String == "quota_exceeded")
        #expect(event["error_message"] as? String == "Quota exceeded for this subkey and model (requests)")
        #expect(event["timestamp"] as? String == "2026-11-29T09:50:45.500000Z")
        #expect(event["request_id"] as? String == "req-2")
        #expect(event["client_ip"] as? String == "10.0.0.6" && event["x_forwarded_for"] as? String == "")
        #expect(
            event["subkey"] as? String == Caller.hash("sk-secret-bob")
                && event["key_id"] as? String == Caller.hash("sk-secret-bob")
        )
        #expect(event["model"] as? String == "o3")
        #expect(!String(decoding: bytes, as: UTF8.self).contains("sk-secret-bob"))

        var anonymous = refusal
        anonymous.caller = nil
        anonymous.model = nil
        anonymous.error = .subkeyRequired
        let plain = try #require(try self.object(envelope.wrap(SplunkEvent.errorEvent(anonymous)))["event"] as? [String: Any])
        #expect(
            plain["subkey"] as? String == "anonymous" && plain["model"] == nil
                && plain["error_type"] as? String == "subkey_required"
        )
    }

    @Test func epochSecondsKeepSixDecimals() {
        #expect(SplunkEvent.epoch(1_795_945_845.123456) == "1795945845.123456")
        #expect(SplunkEvent.epoch(1_795_945_845) == "1795945845.000000")
        #expect(SplunkEvent.epoch(1_795_945_845.9999999) == "1795945846.000000")
    }
}
