/// A JSON document as a tree, for configuration (the quota policy), where the order of members and repeated keys
/// matter. Built on `JSONScanner`, so it is exactly as strict; the chat path never builds one.
enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    /// The number as written.
    case number(String)
    case string(String)
    /// Arrays are never read by the bridge's configuration: only their presence is kept.
    case array
    indirect case object([JSONMember])

    static func parse(_ bytes: [UInt8]) throws(JSONScanner.Failure) -> JSONValue {
        try bytes.withUnsafeBufferPointer { (buffer) throws(JSONScanner.Failure) -> JSONValue in
            try JSONScanner.validate(buffer)
            var start = 0
            var end = buffer.count
            while start < end, Self.isWhitespace(buffer[start]) { start += 1 }
            while end > start, Self.isWhitespace(buffer[end - 1]) { end -= 1 }
            return try value(UnsafeBufferPointer(rebasing: buffer[start..<end]))
        }
    }

    /// A value already validated, with no surrounding whitespace.
    private static func value(_ bytes: UnsafeBufferPointer<UInt8>) throws(JSONScanner.Failure) -> JSONValue {
        guard let first = bytes.first else { throw .invalid }
        switch first {
        case UInt8(ascii: "{"):
            var members: [JSONMember] = []
            for member in try JSONScanner.objectMembers(bytes) {
                let value = try value(UnsafeBufferPointer(rebasing: bytes[member.value]))
                members.append(JSONMember(key: member.key, value: value))
            }
            return .object(members)
        case UInt8(ascii: "\""):
            guard let text = JSONString.decode(UnsafeBufferPointer(rebasing: bytes[1..<(bytes.count - 1)])) else {
                throw .invalid
            }
            return .string(text)
        case UInt8(ascii: "["): return .array
        case UInt8(ascii: "t"): return .bool(true)
        case UInt8(ascii: "f"): return .bool(false)
        case UInt8(ascii: "n"): return .null
        default: return .number(String(decoding: bytes, as: UTF8.self))
        }
    }

    private static func isWhitespace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D
    }

    /// The value as a whole number, when it is a number without a fractional part that fits in 64 bits
    /// (`100`, `-1`, `1e3` and `100.0` all qualify).
    var integer: Int64? {
        guard case .number(let text) = self else { return nil }
        if let exact = Int64(text) { return exact }
        guard let double = Double(text), double.rounded() == double, abs(double) < 9.2e18 else { return nil }
        return Int64(double)
    }

    /// What kind of value this is, for error messages.
    var kind: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

struct JSONMember: Sendable, Equatable {
    var key: String
    var value: JSONValue
}
