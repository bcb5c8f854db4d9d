/// A strict RFC 8259 validator that also reports where an object's members lie, so the bridge can edit a few
/// top-level fields of a client's body and forward every other byte exactly as the client sent it.
///
/// It never builds a tree: a chat body is scanned once, and only the values the bridge reads are decoded.
struct JSONScanner: ~Copyable {
    /// One member of a scanned object: byte offsets into the scanned buffer.
    struct Member: Equatable {
        /// The key, decoded.
        var key: String
        /// From the key's opening quote to the end of its value.
        var range: Range<Int>
        /// The value alone, without surrounding whitespace.
        var value: Range<Int>
    }

    enum Failure: Error, Equatable {
        case invalid
        case tooDeep
    }

    /// Deep enough for any real request; shallow enough that hostile nesting cannot exhaust the stack.
    static let maximumDepth = 256

    private let bytes: UnsafeBufferPointer<UInt8>
    private var index: Int

    private init(_ bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
        self.index = 0
    }

    /// Validates that `bytes` hold exactly one JSON object (surrounded by optional whitespace) and returns its members.
    static func objectMembers(_ bytes: UnsafeBufferPointer<UInt8>) throws(Failure) -> [Member] {
        var scanner = JSONScanner(bytes)
        scanner.skipWhitespace()
        guard scanner.peek == UInt8(ascii: "{") else { throw .invalid }
        let members = try scanner.scanObject(depth: 0, collect: true)
        scanner.skipWhitespace()
        guard scanner.index == bytes.count else { throw .invalid }
        return members
    }

    /// Validates one complete JSON value of any kind.
    static func validate(_ bytes: UnsafeBufferPointer<UInt8>) throws(Failure) {
        var scanner = JSONScanner(bytes)
        scanner.skipWhitespace()
        try scanner.scanValue(depth: 0)
        scanner.skipWhitespace()
        guard scanner.index == bytes.count else { throw .invalid }
    }

    private var peek: UInt8? { index < bytes.count ? bytes[index] : nil }

    private mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x09, 0x0A, 0x0D: index += 1
            default: return
            }
        }
    }

    private mutating func expect(_ byte: UInt8) throws(Failure) {
        guard peek == byte else { throw .invalid }
        index += 1
    }

    private mutating func scanValue(depth: Int) throws(Failure) {
        guard let byte = peek else { throw .invalid }
        switch byte {
        case UInt8(ascii: "{"): _ = try scanObject(depth: depth, collect: false)
        case UInt8(ascii: "["): try scanArray(depth: depth)
        case UInt8(ascii: "\""): _ = try scanString()
        case UInt8(ascii: "t"): try scanLiteral("true")
        case UInt8(ascii: "f"): try scanLiteral("false")
        case UInt8(ascii: "n"): try scanLiteral("null")
        default: try scanNumber()
        }
    }

    private mutating func scanObject(depth: Int, collect: Bool) throws(Failure) -> [Member] {
        guard depth < Self.maximumDepth else { throw .tooDeep }
        try expect(UInt8(ascii: "{"))
        var members: [Member] = []
        skipWhitespace()
        if peek == UInt8(ascii: "}") {
            index += 1
            return members
        }
        while true {
            skipWhitespace()
            let keyStart = index
            let hasEscapes = try scanString()
            let keyEnd = index
            skipWhitespace()
            try expect(UInt8(ascii: ":"))
            skipWhitespace()
            let valueStart = index
            try scanValue(depth: depth + 1)
            if collect {
                let keyBytes = UnsafeBufferPointer(rebasing: bytes[(keyStart + 1)..<(keyEnd - 1)])
                let key = hasEscapes ? (JSONString.decode(keyBytes) ?? "") : String(decoding: keyBytes, as: UTF8.self)
                members.append(Member(key: key, range: keyStart..<index, value: valueStart..<index))
            }
            skipWhitespace()
            guard let next = peek else { throw .invalid }
            index += 1
            if next == UInt8(ascii: "}") { return members }
            guard next == UInt8(ascii: ",") else { throw .invalid }
        }
    }

    private mutating func scanArray(depth: Int) throws(Failure) {
        guard depth < Self.maximumDepth else { throw .tooDeep }
        try expect(UInt8(ascii: "["))
        skipWhitespace()
        if peek == UInt8(ascii: "]") {
            index += 1
            return
        }
        while true {
            skipWhitespace()
            try scanValue(depth: depth + 1)
            skipWhitespace()
            guard let next = peek else { throw .invalid }
            index += 1
            if next == UInt8(ascii: "]") { return }
            guard next == UInt8(ascii: ",") else { throw .invalid }
        }
    }

    /// Scans a string including its quotes; returns whether it holds escapes. Checks escapes and UTF-8.
    private mutating func scanString() throws(Failure) -> Bool {
        try expect(UInt8(ascii: "\""))
        var hasEscapes = false
        while index < bytes.count {
            let byte = bytes[index]
            switch byte {
            case UInt8(ascii: "\""):
                index += 1
                return hasEscapes
            case UInt8(ascii: "\\"):
                hasEscapes = true
                index += 1
                guard let escaped = peek else { throw .invalid }
                switch escaped {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"), UInt8(ascii: "b"), UInt8(ascii: "f"),
                    UInt8(ascii: "n"), UInt8(ascii: "r"), UInt8(ascii: "t"):
                    index += 1
                case UInt8(ascii: "u"):
                    guard index + 4 < bytes.count else { throw .invalid }
                    for offset in 1...4 where JSONString.hexValue(bytes[index + offset]) == nil { throw .invalid }
                    index += 5
                default: throw .invalid
                }
            case 0x00..<0x20: throw .invalid
            case 0x20..<0x80: index += 1
            default: try scanUTF8Sequence()
            }
        }
        throw .invalid
    }

    /// Validates one multi-byte UTF-8 sequence (no overlongs, no surrogates, at most U+10FFFF).
    private mutating func scanUTF8Sequence() throws(Failure) {
        let lead = bytes[index]
        let length: Int
        var lower: UInt8 = 0x80
        var upper: UInt8 = 0xBF
        switch lead {
        case 0xC2...0xDF: length = 2
        case 0xE0:
            length = 3
            lower = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF: length = 3
        case 0xED:
            length = 3
            upper = 0x9F
        case 0xF0:
            length = 4
            lower = 0x90
        case 0xF1...0xF3: length = 4
        case 0xF4:
            length = 4
            upper = 0x8F
        default: throw .invalid
        }
        guard index + length <= bytes.count else { throw .invalid }
        let second = bytes[index + 1]
        guard second >= lower, second <= upper else { throw .invalid }
        for offset in 2..<max(2, length) where bytes[index + offset] & 0xC0 != 0x80 { throw .invalid }
        index += length
    }

    private mutating func scanLiteral(_ literal: StaticString) throws(Failure) {
        let expected = UnsafeBufferPointer(start: literal.utf8Start, count: literal.utf8CodeUnitCount)
        guard index + expected.count <= bytes.count else { throw .invalid }
        for offset in 0..<expected.count where bytes[index + offset] != expected[offset] { throw .invalid }
        index += expected.count
    }

    private mutating func scanNumber() throws(Failure) {
        if peek == UInt8(ascii: "-") { index += 1 }
        guard let first = peek, Self.isDigit(first) else { throw .invalid }
        index += 1
        if first != UInt8(ascii: "0") { skipDigits() }
        if peek == UInt8(ascii: ".") {
            index += 1
            guard let digit = peek, Self.isDigit(digit) else { throw .invalid }
            skipDigits()
        }
        if peek == UInt8(ascii: "e") || peek == UInt8(ascii: "E") {
            index += 1
            if peek == UInt8(ascii: "+") || peek == UInt8(ascii: "-") { index += 1 }
            guard let digit = peek, Self.isDigit(digit) else { throw .invalid }
            skipDigits()
        }
    }

    private mutating func skipDigits() {
        while let byte = peek, Self.isDigit(byte) { index += 1 }
    }

    private static func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }
}
