import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@testable import OAIToCircuit

/// `ReadAheadHandler`: one read asked for while a whole request is answered, none more with a second one waiting.
struct ReadAheadTests {
    /// Counts the reads that reach the channel's end of the pipeline.
    final class ReadCounter: ChannelOutboundHandler {
        typealias OutboundIn = NIOAny
        var reads = 0

        func read(context: ChannelHandlerContext) {
            reads += 1
            context.read()
        }
    }

    @Test func oneReadIsAskedForWhileARequestIsAnswered() throws {
        let counter = ReadCounter()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandlers([counter, ReadAheadHandler()])
        let head = HTTPRequestHead(version: .http1_1, method: .POST, uri: "/v1/chat/completions")

        try channel.writeInbound(HTTPServerRequestPart.head(head))
        try channel.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: "{}")))
        #expect(counter.reads == 0)
        try channel.writeInbound(HTTPServerRequestPart.end(nil))
        #expect(counter.reads == 1)
        // A second request pipelined behind it: no more reads until the first is answered.
        try channel.writeInbound(HTTPServerRequestPart.head(head))
        try channel.writeInbound(HTTPServerRequestPart.end(nil))
        #expect(counter.reads == 1)

        let answer = HTTPResponseHead(version: .http1_1, status: .ok)
        try channel.writeOutbound(HTTPServerResponsePart.head(answer))
        try channel.writeOutbound(HTTPServerResponsePart.end(nil))
        try channel.writeOutbound(HTTPServerResponsePart.head(answer))
        try channel.writeOutbound(HTTPServerResponsePart.end(nil))
        // An answer that ends before its request does (a refusal) leaves nothing to read ahead for.
        try channel.writeInbound(HTTPServerRequestPart.head(head))
        try channel.writeOutbound(HTTPServerResponsePart.head(answer))
        try channel.writeOutbound(HTTPServerResponsePart.end(nil))
        try channel.writeInbound(HTTPServerRequestPart.end(nil))
        #expect(counter.reads == 1)
        // The next request reads ahead again.
        try channel.writeInbound(HTTPServerRequestPart.head(head))
        try channel.writeInbound(HTTPServerRequestPart.end(nil))
        #expect(counter.reads == 2)
        _ = try channel.finish(acceptAlreadyClosed: true)
    }
}

extension ReadAheadTests {
    /// Answers the head of every request at once, as a refusal does, before the request's end arrives.
    final class Refuser: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .head = unwrapInboundIn(data) else { return }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .forbidden))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    /// A request answered while its head is being handed on counts as answered: the next request reads ahead again.
    @Test func aRequestAnsweredAtItsHeadLeavesNothingOwed() throws {
        let counter = ReadCounter()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandlers([counter, ReadAheadHandler(), Refuser()])
        let head = HTTPRequestHead(version: .http1_1, method: .POST, uri: "/v1/chat/completions")
        for _ in 0..<3 {
            try channel.writeInbound(HTTPServerRequestPart.head(head))
            try channel.writeInbound(HTTPServerRequestPart.end(nil))
        }
        #expect(counter.reads == 0)
        _ = try channel.finish(acceptAlreadyClosed: true)
    }
}
