import NIOCore
import Testing

@testable import OAIToCircuit

@Suite(.timeLimit(.minutes(1))) struct ServerSentEventFilterTests {
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
        for hiding in [true, false] {
            var filter = ServerSentEventFilter(hidesUsageChunk: hiding)
            var sent = 0
            // One endless data line, then endless data lines of one event.
            for _ in 0..<200 {
                sent += filter.consume(ByteBuffer(string: "data: " + String(repeating: "x", count: 8192)))?.readableBytes ?? 0
            }
            for _ in 0..<200 {
                sent += filter.consume(ByteBuffer(string: "data: \(String(repeating: "y", count: 8192))\n"))?.readableBytes ?? 0
            }
            let held = 400 * 8198 - sent
            #expect(held <= 2 * ServerSentEventFilter.maximumHeld, "holding \(held) bytes")
            // The oversized event is passed on, never parsed or hidden; the stream then goes on normally.
            let usage = #"data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}"#
            let rest =
                (filter.consume(ByteBuffer(string: "\n\n" + usage + "\n\ndata: [DONE]\n\n")).map { String(buffer: $0) } ?? "")
                + (filter.finish().map { String(buffer: $0) } ?? "")
            #expect(filter.usage?.totalTokens == 3)
            #expect(rest.contains("total") == false || !hiding)
            #expect(rest.hasSuffix("data: [DONE]\n\n"))
        }
    }

    @Test func usageWithoutAChoicesKeyIsRecordedButNotHidden() {
        let text = "data: {\"usage\": {\"prompt_tokens\": 2, \"completion_tokens\": 2, \"total_tokens\": 4}}\n\ndata: [DONE]\n\n"
        let (sent, tail, filter) = Self.run(text, hiding: true, pieceSize: 10)
        #expect(filter.usage?.totalTokens == 4)
        #expect((sent + tail) == text)
    }

    @Test func abandonDropsWhatIsHeldAndEndsTheEventInProgress() {
        var passing = ServerSentEventFilter(hidesUsageChunk: false)
        _ = passing.consume(ByteBuffer(string: "data: {\"a\": 1}\n\ndata: {\"b\": 2}\ndata: {\"c\""))
        // A data line of an unfinished event was sent: a blank line ends it before the bridge's own event.
        #expect(passing.abandon().map { String(buffer: $0) } == "\n")
        var hiding = ServerSentEventFilter(hidesUsageChunk: true)
        let sent = hiding.consume(ByteBuffer(string: "data: {\"a\": 1}\n\ndata: {\"b\": 2}\ndata: {\"c\""))
        #expect(sent.map { String(buffer: $0) } == "data: {\"a\": 1}\n\n")
        #expect(hiding.abandon() == nil)
    }

    @Test func hugeTokenCountsAreClampedNotTrapped() {
        let text =
            "data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 9223372036854775807, \"completion_tokens\": 9223372036854775807}}\n\n"
        let (_, _, filter) = Self.run(text, hiding: true, pieceSize: 4096)
        #expect(filter.usage?.promptTokens == Usage.maximumCount)
        #expect(filter.usage?.totalTokens == 2 * Usage.maximumCount)
    }
}
