import NIOCore
import Testing

@testable import OAIToCircuit

@Suite struct ServerSentEventFilterTests {
    static let stream = [
        #"data: {"choices": [], "prompt_filter_results": []}"#, "",
        #"data: {"choices": [{"delta": {"content": "Hi"}}], "usage": null}"#, "",
        ": a comment", "event: message",
        #"data:{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}"#, "",
        "data: [DONE]", "", "",
    ].joined(separator: "\n")

    /// Feeds `text` split into pieces of `size` bytes; returns what was sent before the end and at the end.
    static func run(
        _ text: String,
        hiding: Bool,
        pieceSize size: Int
    ) -> (beforeEnd: String, atEnd: String, filter: ServerSentEventFilter) {
        var filter = ServerSentEventFilter(hidesUsageChunk: hiding)
        let bytes = Array(text.utf8)
        var sent = ""
        var start = 0
        while start < bytes.count {
            let end = min(start + size, bytes.count)
            if let out = filter.consume(ByteBuffer(bytes: bytes[start..<end])) { sent += String(buffer: out) }
            start = end
        }
        let tail = filter.finish().map { String(buffer: $0) } ?? ""
        return (sent, tail, filter)
    }

    @Test(arguments: [1, 2, 3, 7, 64, 4096])
    func hidesOnlyTheUsageChunkWhateverTheSplit(_ size: Int) {
        let (sent, tail, filter) = Self.run(Self.stream, hiding: true, pieceSize: size)
        #expect(filter.usage == Usage(promptTokens: 3, completionTokens: 2, totalTokens: 5))
        #expect(sent.contains("prompt_filter_results") && sent.contains(#""usage": null"#))
        #expect(!(sent + tail).contains("total_tokens"))
        #expect(!(sent + tail).contains("event: message"))
        #expect(!sent.contains("[DONE]") && tail.hasPrefix("data: [DONE]"))
    }

    @Test(arguments: [1, 5, 4096])
    func passesEverythingWhenTheClientAskedForUsage(_ size: Int) {
        let (sent, tail, filter) = Self.run(Self.stream, hiding: false, pieceSize: size)
        #expect(sent + tail == Self.stream)
        #expect(!sent.contains("[DONE]"))
        #expect(filter.usage?.totalTokens == 5 && filter.sawDone)
    }

    @Test func crlfAndUnterminatedLastEvent() {
        let text =
            "data: {\"choices\": [{}]}\r\n\r\ndata:{\"choices\": [], \"usage\": {\"prompt_tokens\": 1, \"completion_tokens\": 1}}\r\n"
        let (sent, tail, filter) = Self.run(text, hiding: true, pieceSize: 3)
        #expect(filter.usage == Usage(promptTokens: 1, completionTokens: 1, totalTokens: 2))
        #expect(sent == "data: {\"choices\": [{}]}\r\n\r\n" && tail.isEmpty)
    }

    @Test func linesAreSentAsSoonAsTheyAreComplete() {
        var filter = ServerSentEventFilter(hidesUsageChunk: false)
        #expect(filter.consume(ByteBuffer(string: "data: {\"a\"")) == nil)
        #expect(filter.consume(ByteBuffer(string: ": 1}\n")).map { String(buffer: $0) } == "data: {\"a\": 1}\n")
    }

    @Test func anUpstreamThatNeverEndsAnEventCannotGrowTheBufferWithoutBound() {
        var filter = ServerSentEventFilter(hidesUsageChunk: true)
        var sent = 0
        for _ in 0..<300 {
            sent += filter.consume(ByteBuffer(string: String(repeating: "x", count: 8191) + "\n"))?.readableBytes ?? 0
        }
        #expect(sent > 0)
    }
}
