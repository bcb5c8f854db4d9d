import NIOCore
import Testing

@testable import OAIToCircuit

@Suite(.timeLimit(.minutes(1))) struct ChatRequestTests {
    func parse(_ text: String, appKey: String = "key") throws(BridgeError) -> (ChatRequest, String) {
        let request = try ChatRequest.parse(ByteBuffer(string: text), appKey: appKey)
        return (request, String(buffer: request.upstreamBody))
    }

    @Test func lastDuplicateKeyWinsAndEveryModelIsRemoved() throws {
        let (request, body) = try parse(#"{"model": "../x", "model": "gpt-4o", "messages": []}"#)
        #expect(request.model == "gpt-4o")
        #expect(body == #"{"messages": [], "user": "{\"appkey\": \"key\"}"}"#)
    }

    @Test func escapedModelNameIsDecodedBeforeValidation() throws {
        #expect(throws: BridgeError.invalidModel(ModelName.rule)) { try parse(#"{"model": "a\/b"}"#) }
        let (request, _) = try parse(#"{"model": "gpt\u002d4o"}"#)
        #expect(request.model == "gpt-4o")
    }

    @Test func streamFlagAndUsageOptions() throws {
        let (plain, plainBody) = try parse(#"{"model": "m", "stream": false, "stream_options": 5}"#)
        #expect(!plain.isStreaming && plainBody.contains(#""stream_options": 5"#))
        let (streaming, body) = try parse(#"{"model": "m", "stream": true}"#)
        #expect(streaming.isStreaming && !streaming.clientWantsUsage)
        #expect(body.hasSuffix(#", "stream_options": {"include_usage": true}}"#))
        let (asked, askedBody) = try parse(#"{"model": "m", "stream": true, "stream_options": {"include_usage": true}}"#)
        #expect(asked.clientWantsUsage && askedBody.contains(#""stream_options": {"include_usage": true}"#))
        let (null, nullBody) = try parse(#"{"model": "m", "stream": true, "stream_options": null}"#)
        #expect(!null.clientWantsUsage && nullBody.contains(#""stream_options": {"include_usage": true}"#))
    }

    @Test func userRules() throws {
        #expect(try parse(#"{"model": "m", "user": "{\"a\": 1}"}"#).1.contains(#""user": "{\"a\": 1, \"appkey\": \"key\"}""#))
        #expect(try parse(#"{"model": "m", "user": "{}"}"#).1.contains(#""user": "{\"appkey\": \"key\"}""#))
        #expect(try parse(#"{"model": "m", "user": "has key inside"}"#).1.contains(#""user": "has key inside""#))
        #expect(try parse(#"{"model": "m", "user": 42}"#).1.contains(#""user": 42"#))
        #expect(try parse(#"{"model": "m", "user": "[1]"}"#).1.contains(#""user": "[1]""#))
        // Without an appkey configured a present user is left alone, and a missing one gets an empty appkey.
        #expect(try parse(#"{"model": "m", "user": "{\"a\": 1}"}"#, appKey: "").1.contains(#""user": "{\"a\": 1}""#))
        #expect(try parse(#"{"model": "m"}"#, appKey: "").1.contains(#""user": "{\"appkey\": \"\"}""#))
        // An appkey with quotes stays valid JSON at both levels.
        #expect(try parse(#"{"model": "m"}"#, appKey: #"k"1"#).1.contains(#""user": "{\"appkey\": \"k\\\"1\"}""#))
    }

    @Test func repeatedAppkeysInUserCollapseToOne() throws {
        // ("key" would be found inside "appkey" itself, so a longer appkey.)
        let body = try parse(#"{"model": "m", "user": "{\"appkey\": \"a\", \"x\": 1, \"appkey\": \"b\"}"}"#, appKey: "k-123").1
        #expect(body.contains(#""user": "{\"appkey\": \"k-123\", \"x\": 1}""#))
    }

    @Test(arguments: ["0", "false", "[]", "{}", "null", #""""#])
    func falsyUsersCountAsMissing(_ value: String) throws {
        #expect(try parse(#"{"model": "m", "user": \#(value)}"#).1.hasSuffix(#""user": "{\"appkey\": \"key\"}"}"#))
    }
}
