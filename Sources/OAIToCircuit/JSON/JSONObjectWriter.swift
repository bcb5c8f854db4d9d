/// Writes one JSON object member by member, in order, with our string encoder (health fields, Splunk events).
/// `compact` leaves out the spaces after commas and colons (Splunk events, where every byte is stored and sent).
struct JSONObjectWriter {
    private var bytes: [UInt8] = [UInt8(ascii: "{")]
    private var needsComma = [false]
    private let comma: [UInt8]
    private let colon: [UInt8]

    init(compact: Bool = false) {
        comma = compact ? [UInt8(ascii: ",")] : Array(", ".utf8)
        colon = compact ? [UInt8(ascii: ":")] : Array(": ".utf8)
    }

    private mutating func key(_ name: String) {
        if needsComma[needsComma.count - 1] { bytes.append(contentsOf: comma) }
        needsComma[needsComma.count - 1] = true
        JSONString.encode(name, into: &bytes)
        bytes.append(contentsOf: colon)
    }

    mutating func string(_ name: String, _ value: String) {
        key(name)
        JSONString.encode(value, into: &bytes)
    }

    /// A string, or `null` when there is none.
    mutating func string(_ name: String, _ value: String?) {
        guard let value else {
            key(name)
            bytes.append(contentsOf: "null".utf8)
            return
        }
        string(name, value)
    }

    /// A number already written as JSON.
    mutating func number(_ name: String, exact text: String) {
        key(name)
        bytes.append(contentsOf: text.utf8)
    }

    mutating func bool(_ name: String, _ value: Bool) {
        key(name)
        bytes.append(contentsOf: (value ? "true" : "false").utf8)
    }

    mutating func open(_ name: String) {
        key(name)
        bytes.append(UInt8(ascii: "{"))
        needsComma.append(false)
    }

    mutating func close() {
        bytes.append(UInt8(ascii: "}"))
        needsComma.removeLast()
    }

    mutating func finish() -> [UInt8] {
        bytes.append(UInt8(ascii: "}"))
        return bytes
    }
}
