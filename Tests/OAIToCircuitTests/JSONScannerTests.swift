import Testing

@testable import OAIToCircuit

@Suite(.timeLimit(.minutes(1))) struct JSONScannerTests {
    func members(_ text: String) throws -> [JSONScanner.Member] {
        var bytes = Array(text.utf8)
        return try bytes.withUnsafeMutableBufferPointer { try JSONScanner.objectMembers(UnsafeBufferPointer($0)) }
    }

    func isValid(_ text: String) -> Bool {
        var bytes = Array(text.utf8)
        return bytes.withUnsafeMutableBufferPointer { (try? JSONScanner.validate(UnsafeBufferPointer($0))) != nil }
    }

    @Test(arguments: [
        "{}", "[]", "0", "-0.5e+10", "\"\\u00e9\\ud83d\\ude00\"", "true", "null", " {\"a\" : [1, {\"b\": null}] } ",
        "\"é😀\"", "[1E5, 0.0, -1]",
    ])
    func accepts(_ text: String) { #expect(isValid(text)) }

    @Test(arguments: [
        "", "{", "{\"a\"}", "{\"a\":}", "{\"a\":1,}", "[1,]", "01", "1.", ".5", "+1", "1e", "tru", "nul", "\"\\x\"",
        "\"\\u12\"", "\"a\nb\"", "{} {}", "{'a': 1}", "[1 2]", "NaN", "{\"a\":1}}",
    ])
    func rejects(_ text: String) { #expect(!isValid(text)) }

    @Test func rejectsInvalidUTF8() {
        for bytes: [UInt8] in [
            [0x22, 0xC0, 0xAF, 0x22], [0x22, 0xED, 0xA0, 0x80, 0x22], [0x22, 0xF5, 0x80, 0x80, 0x80, 0x22],
            [0x22, 0xE2, 0x82, 0x22],
        ] {
            var copy = bytes
            #expect(copy.withUnsafeMutableBufferPointer { (try? JSONScanner.validate(UnsafeBufferPointer($0))) == nil })
        }
    }

    @Test func deepNestingIsRefusedWithoutCrashing() {
        #expect(!isValid(String(repeating: "[", count: 1_000_000)))
        #expect(isValid(String(repeating: "[", count: 200) + String(repeating: "]", count: 200)))
    }

    @Test func membersAndRanges() throws {
        let text = #"{ "model" : "gpt-4o", "a\"b": [1, 2], "n": -1.5 }"#
        let found = try members(text)
        #expect(found.map(\.key) == ["model", "a\"b", "n"])
        let bytes = Array(text.utf8)
        #expect(String(decoding: bytes[found[0].value], as: UTF8.self) == #""gpt-4o""#)
        #expect(String(decoding: bytes[found[1].range], as: UTF8.self) == #""a\"b": [1, 2]"#)
        #expect(String(decoding: bytes[found[2].value], as: UTF8.self) == "-1.5")
        #expect(throws: JSONScanner.Failure.self) { try members("[1]") }
    }

    @Test func stringDecodingAndEncoding() {
        var bytes = Array(#"a\"b\\c\/\n\u00e9\ud83d\ude00"#.utf8)
        let decoded = bytes.withUnsafeMutableBufferPointer { JSONString.decode(UnsafeBufferPointer($0)) }
        #expect(decoded == "a\"b\\c/\né😀")
        var lone = Array(#"\ud83d"#.utf8)
        #expect(lone.withUnsafeMutableBufferPointer { JSONString.decode(UnsafeBufferPointer($0)) } == nil)
        #expect(String(decoding: JSONString.encode("q\"\\\n\u{01}é"), as: UTF8.self) == #""q\"\\\n\u0001é""#)
    }
}
