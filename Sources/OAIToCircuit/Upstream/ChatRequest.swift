import NIOCore

/// A client's chat completions body, validated, and the body Circuit gets instead.
///
/// Circuit's body is the client's minus `model`, with `user` carrying the appkey and, for streams,
/// `stream_options.include_usage` set. Every other member is copied byte for byte.
public struct ChatRequest: Sendable {
    public var model: String
    public var isStreaming: Bool
    /// The client itself set `stream_options.include_usage`; otherwise the usage-only chunk is hidden from it.
    public var clientWantsUsage: Bool
    public var upstreamBody: ByteBuffer

    /// Validates `body` (a JSON object with a valid `model`) and builds Circuit's body.
    public static func parse(_ body: ByteBuffer, appKey: String) throws(BridgeError) -> ChatRequest {
        let result: Result<ChatRequest, BridgeError> = body.withUnsafeReadableBytes { raw in
            let bytes = raw.assumingMemoryBound(to: UInt8.self)
            do throws(BridgeError) {
                return .success(try parse(bytes, appKey: appKey))
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    private static func parse(_ bytes: UnsafeBufferPointer<UInt8>, appKey: String) throws(BridgeError) -> ChatRequest {
        let members: [JSONScanner.Member]
        do {
            members = try JSONScanner.objectMembers(bytes)
        } catch {
            throw .invalidJSON
        }
        // Duplicate keys: the last one counts, as in most JSON parsers (Python's included).
        var last: [String: Int] = [:]
        for (position, member) in members.enumerated() { last[member.key] = position }

        guard let modelPosition = last["model"],
            let model = decodedString(bytes, members[modelPosition].value), !model.isEmpty
        else { throw .modelRequired }
        if let rule = ModelName.validate(model) { throw .invalidModel(rule) }

        let isStreaming = last["stream"].map { bytes[members[$0].value].elementsEqual("true".utf8) } ?? false
        var clientWantsUsage = false
        var streamOptions: [UInt8]?
        if isStreaming {
            (clientWantsUsage, streamOptions) = streamOptionsAskingForUsage(bytes, last["stream_options"].map { members[$0] })
        }
        let user = userValue(bytes, last["user"].map { members[$0] }, appKey: appKey)

        var out = ByteBufferAllocator().buffer(capacity: bytes.count + 96)
        out.writeInteger(UInt8(ascii: "{"))
        var first = true
        func separator() {
            if !first { out.writeBytes(", ".utf8) }
            first = false
        }
        func write(key: String, value: [UInt8]) {
            separator()
            out.writeBytes(JSONString.encode(key))
            out.writeBytes(": ".utf8)
            out.writeBytes(value)
        }
        for (position, member) in members.enumerated() {
            switch member.key {
            case "model":
                continue
            case "user" where user != nil, "stream_options" where streamOptions != nil:
                guard position == last[member.key] else { continue }
                write(key: member.key, value: member.key == "user" ? user! : streamOptions!)
            default:
                separator()
                out.writeBytes(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(bytes)[member.range]))
            }
        }
        if let user, last["user"] == nil { write(key: "user", value: user) }
        if let streamOptions, last["stream_options"] == nil { write(key: "stream_options", value: streamOptions) }
        out.writeInteger(UInt8(ascii: "}"))
        return ChatRequest(model: model, isStreaming: isStreaming, clientWantsUsage: clientWantsUsage, upstreamBody: out)
    }

    /// The new `user` value, or `nil` to forward the client's unchanged.
    ///
    /// As the earlier bridge did: missing or empty → `{"appkey": "<appkey>"}` as a JSON string; a string that
    /// does not already contain the appkey and parses as a JSON object → that object with `appkey` set;
    /// anything else is forwarded unchanged.
    private static func userValue(
        _ bytes: UnsafeBufferPointer<UInt8>,
        _ member: JSONScanner.Member?,
        appKey: String
    )
        -> [UInt8]?
    {
        var inner: [UInt8] = Array(#"{"appkey": "#.utf8)
        JSONString.encode(appKey, into: &inner)
        inner.append(UInt8(ascii: "}"))
        guard let member else { return JSONString.encode(String(decoding: inner, as: UTF8.self)) }
        // Python's `if not user`: null, "", 0, false, [] and {} all count as missing.
        let raw = bytes[member.value]
        let empty = ["null", #""""#, "0", "false", "[]", "{}"]
        if empty.contains(where: { raw.elementsEqual($0.utf8) }) {
            return JSONString.encode(String(decoding: inner, as: UTF8.self))
        }
        guard !appKey.isEmpty, let user = decodedString(bytes, member.value), !user.contains(appKey) else { return nil }
        var userBytes = Array(user.utf8)
        return userBytes.withUnsafeMutableBufferPointer { buffer -> [UInt8]? in
            let userBuffer = UnsafeBufferPointer(buffer)
            guard let fields = try? JSONScanner.objectMembers(userBuffer) else { return nil }
            // Re-serialised the way Python's json.dumps writes it: ", " and ": " separators, appkey kept in place.
            var object: [UInt8] = [UInt8(ascii: "{")]
            var replaced = false
            for field in fields {
                // A repeated appkey is dropped: the first one carries the new value.
                if field.key == "appkey", replaced { continue }
                if object.count > 1 { object.append(contentsOf: ", ".utf8) }
                JSONString.encode(field.key, into: &object)
                object.append(contentsOf: ": ".utf8)
                if field.key == "appkey" {
                    JSONString.encode(appKey, into: &object)
                    replaced = true
                } else {
                    object.append(contentsOf: userBuffer[field.value])
                }
            }
            if !replaced {
                if object.count > 1 { object.append(contentsOf: ", ".utf8) }
                object.append(contentsOf: #""appkey": "#.utf8)
                JSONString.encode(appKey, into: &object)
            }
            object.append(UInt8(ascii: "}"))
            return JSONString.encode(String(decoding: object, as: UTF8.self))
        }
    }

    /// Whether the client asked for usage, and the `stream_options` value to send instead (`nil`: unchanged).
    private static func streamOptionsAskingForUsage(
        _ bytes: UnsafeBufferPointer<UInt8>,
        _ member: JSONScanner.Member?
    )
        -> (Bool, [UInt8]?)
    {
        let fresh = Array(#"{"include_usage": true}"#.utf8)
        guard let member else { return (false, fresh) }
        let value = UnsafeBufferPointer(rebasing: bytes[member.value])
        guard let fields = try? JSONScanner.objectMembers(value) else { return (false, fresh) }
        var last: [String: Int] = [:]
        for (position, field) in fields.enumerated() { last[field.key] = position }
        if let position = last["include_usage"], value[fields[position].value].elementsEqual("true".utf8) {
            return (true, nil)
        }
        var object: [UInt8] = [UInt8(ascii: "{")]
        for field in fields where field.key != "include_usage" {
            object.append(contentsOf: value[field.range])
            object.append(contentsOf: ", ".utf8)
        }
        object.append(contentsOf: #""include_usage": true}"#.utf8)
        return (false, object)
    }

    private static func decodedString(_ bytes: UnsafeBufferPointer<UInt8>, _ range: Range<Int>) -> String? {
        guard range.count >= 2, bytes[range.lowerBound] == UInt8(ascii: "\"") else { return nil }
        return JSONString.decode(UnsafeBufferPointer(rebasing: bytes[(range.lowerBound + 1)..<(range.upperBound - 1)]))
    }
}
