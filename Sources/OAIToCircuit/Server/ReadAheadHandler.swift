import NIOCore
import NIOHTTP1

/// Keeps a connection readable while its request is answered. NIO's `HTTPServerPipelineHandler`, next in the
/// pipeline, holds back read requests from a request's end until its answer's end, so the event loop took the socket
/// out of its poll set after every request and put it back before every answer: two `epoll_ctl` calls on the way of
/// each answer. This handler asks for one read itself when a request has arrived whole; a pipelined request that
/// comes meanwhile is read and waits in the pipelining handler, and with one waiting no more is asked for.
final class ReadAheadHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    /// Requests begun whose answer's end has not been written (an answer may end before its request does).
    private var unanswered = 0

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        // Counted first: the head may be answered at once (a refusal), before `fireChannelRead` returns.
        if case .head = part { unanswered += 1 }
        context.fireChannelRead(data)
        if case .end = part, unanswered == 1 { context.read() }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = unwrapOutboundIn(data) { unanswered = max(0, unanswered - 1) }
        context.write(data, promise: promise)
    }
}
