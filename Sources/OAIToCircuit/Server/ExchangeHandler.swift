import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypesHTTP1

/// Serves one client connection, one request at a time (NIO's `HTTPServerPipelineHandler` in front holds back a
/// pipelined request until the answer before it is written). One task per request runs the responder, started from
/// the request's head; a chat request's body is read here, on the event loop, and handed to it whole (any other
/// request's body is dropped, see `readsBody`); the answer is written back from here. An async channel per connection
/// instead hands every request part and every written part across a task boundary, which cost the bridge about
/// 70 µs per request at concurrency 1 (docs/PERFORMANCE.md, change 7).
///
/// A body over `bodyLimit` is not kept: the responder is told it is too large (the chat route answers 413 once the
/// subkey is checked, as soon as the announced length or the bytes read pass the limit), and the rest is read and
/// dropped, so the connection can serve the next request; so is the rest of a body whose answer did not wait for it
/// (a refused subkey).
/// A connection that stays silent for `idleTimeout` between requests, or while a request's body is being read, is
/// closed; while an answer is being made it is not (Circuit's own timeout bounds that), unless the client stops
/// reading it: bytes waiting to go out and none taken for a whole `idleTimeout` close the connection, and the
/// answer's task sees a client gone (a stream stops reading Circuit, whose connection goes).
final class ExchangeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private enum State {
        /// Between requests.
        case idle
        /// The responder has the request. Until `requestEnded`, its body is read (`arriving`), or dropped.
        case answering(requestEnded: Bool, closeAfter: Bool)
        /// The answer is written; the rest of the request (a body too large, or one the answer did not wait for) is
        /// dropped until its end.
        case draining(closeAfter: Bool)
        /// The last answer's end is written and the connection closes once it is out; whatever arrives meanwhile
        /// (a pipelined request after `Connection: close`) is dropped.
        case closing
        case closed
    }

    private let responder: BridgeResponder
    private let bodyLimit: Int
    private let idleTimeout: TimeAmount
    private let secure: Bool
    private let connections: ConnectionSet
    private let requireSubkey: Bool
    private let logger: Logger
    private var state = State.idle
    private var lastActivity = NIODeadline.now()
    private var idleCheck: Scheduled<Void>?
    /// How many requests this connection has handed over: the current exchange's number.
    private var exchanges = 0
    /// The answers' tasks still running, by exchange (the one before the current may still be finishing after its
    /// last byte), cancelled when the listener is stopped for good. Until the last is over, it (not the
    /// connection's end) takes the connection off the listener's list.
    private var answers: [Int: Task<Void, Never>] = [:]
    /// The connection's name in the listener's list.
    private var connectionID: ObjectIdentifier?
    /// The last answer's end, written or on its way: a close waits for it, since closing drops what is not yet out.
    private var lastEnd: EventLoopFuture<Void>?
    /// Where the answers' tasks run: this connection's event loop.
    private var taskExecutor: EventLoopTaskExecutor!
    /// The requests the loop's connections are answering: one per entry of `answers`.
    private var loopLoad: LoopLoad!
    /// The body of the request being answered, while it arrives, and the responder's promise of it.
    private var arriving: (body: ByteBuffer, promise: EventLoopPromise<ByteBuffer>)?
    /// The last exchange whose answer has its head written.
    private var headWritten = 0
    /// Parts the answers' tasks have handed to the channel, and what the last stall check saw: a client that takes
    /// nothing of what waits to go out, while nothing more is written, has stopped reading (`stalled(context:)`).
    fileprivate var partsWritten = 0
    private var stallMark: (parts: Int, buffered: Int)?
    /// An exchange that HTTP's error handler in front answered (400: its body could not be parsed) before its task
    /// wrote anything: the task must write nothing, since a second answer to one request would break the framing.
    private var answeredInFront = 0

    init(
        responder: BridgeResponder,
        bodyLimit: Int,
        idleTimeout: TimeAmount,
        secure: Bool,
        connections: ConnectionSet,
        logger: Logger
    ) {
        self.responder = responder
        self.requireSubkey = responder.bridge.configuration.requireSubkey
        self.logger = logger
        self.bodyLimit = bodyLimit
        self.idleTimeout = idleTimeout
        self.secure = secure
        self.connections = connections
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let loop = context.eventLoop
        taskExecutor = EventLoopTaskExecutor(loop)
        loopLoad = LoopLoad.ofCurrentThread()
        let handler = NIOLoopBound(self, eventLoop: loop)
        let bound = NIOLoopBound(context, eventLoop: loop)
        let id = ObjectIdentifier(context.channel)
        connectionID = id
        connections.insert(id) { loop.execute { handler.value.abort(context: bound.value) } }
        armIdleCheck(context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        idleCheck?.cancel()
        idleCheck = nil
        abandonBody()
        // Also for a channel closed before it ever became active (no `channelInactive` then).
        state = .closed
        if answers.isEmpty { leave() }
    }

    func channelInactive(context: ChannelHandlerContext) {
        idleCheck?.cancel()
        idleCheck = nil
        abandonBody()
        state = .closed
        // An answer in progress finishes on its own (a stream notices through `ClientHangUpHandler`).
        if answers.isEmpty { leave() }
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        lastActivity = .now()
        switch (unwrapInboundIn(data), state) {
        case (.head(let head), .idle):
            guard readsBody(of: head) else {
                // Answered from its head; whatever body it has is dropped.
                dispatch(head, body: .none, context: context)
                return
            }
            let announced = head.headers.first(name: "content-length").flatMap { Int($0) }
            let expectsContinue = head.headers.first(name: "expect")?.lowercased() == "100-continue"
            if let announced, announced > bodyLimit {
                // A client waiting for `100 Continue` sends no body after the refusal: its request is over.
                let refused: EventLoopFuture<ByteBuffer> = context.eventLoop.makeFailedFuture(tooLarge)
                dispatch(head, body: .arriving(refused), withheld: expectsContinue, context: context)
                return
            }
            if expectsContinue, head.version.minor >= 1 {  // HTTP/1.0 clients know no `100 Continue`
                let proceed = HTTPResponseHead(version: head.version, status: .continue)
                context.writeAndFlush(wrapOutboundOut(.head(proceed)), promise: nil)
            }
            // Reserve what the client announced, but not much: announcing costs it nothing.
            let promise = context.eventLoop.makePromise(of: ByteBuffer.self)
            arriving = (context.channel.allocator.buffer(capacity: min(announced ?? 0, 64 << 10)), promise)
            dispatch(head, body: .arriving(promise.futureResult), context: context)
        case (.body(var part), .answering):
            guard var body = arriving else { break }  // a body not read, or one past the limit
            arriving = nil  // leaves the buffer with one reference, so appending does not copy it
            guard body.body.readableBytes + part.readableBytes <= bodyLimit else {
                body.promise.fail(tooLarge)
                break
            }
            body.body.writeBuffer(&part)
            arriving = body
        case (.body, .draining):
            break  // the rest of a body the answer did not wait for
        case (.end, .answering(_, let closeAfter)):
            if let (body, promise) = arriving {
                arriving = nil
                promise.succeed(body)
            }
            state = .answering(requestEnded: true, closeAfter: closeAfter)
        case (.end, .draining(let closeAfter)):
            if closeAfter {
                close(context: context)
            } else {
                state = .idle
            }
        case (_, .closed), (_, .closing):
            break
        case (let part, let state):
            // The pipeline handler in front delivers one request at a time, whole: anything else is a bug.
            assertionFailure("request part \(part) in state \(state)")
            close(context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            switch state {
            case .idle, .draining:
                // Nothing more will come: a request half dropped is abandoned, as is an idle connection.
                close(context: context)
            case .closing:
                break
            case .answering:
                // A client may half-close once it has sent its request: it still gets the answer (a body cut short
                // is refused with 400), then the connection closes.
                abandonBody()
                state = .answering(requestEnded: true, closeAfter: true)
            case .closed:
                break
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Parse errors were answered (400) by the protocol error handler in front, unless an answer had begun;
        // anything else (a failed TLS handshake, a reset) ends the connection. Only the error's type is logged: it
        // cannot carry a secret.
        logger.debug("connection error", metadata: ["error": "\(type(of: error))"])
        if error is HTTPParserError, headWritten != exchanges { answeredInFront = exchanges }
        abandonBody()
        close(context: context)
    }

    /// Whether exchange `number`'s task may still write to the connection.
    fileprivate func mayWrite(_ number: Int) -> Bool { number != answeredInFront }

    fileprivate func writingHead(_ number: Int) { headWritten = number }

    // MARK: Answering

    /// Only a chat request's body is read, and only when it can be answered: a chat request without a subkey, when
    /// one is required, is refused (401) from its head, so an unknown client cannot make the bridge hold a body.
    private func readsBody(of head: HTTPRequestHead) -> Bool {
        guard head.method == .POST, Self.path(of: head.uri) == "/v1/chat/completions" else { return false }
        guard requireSubkey else { return true }
        return head.headers.contains(name: "authorization") || head.headers.contains(name: "x-bridge-subkey")
    }

    /// The request target's path, as the responder's routing reads it (origin form, or the absolute form's path).
    /// The usual origin form (`/v1/…`) is read byte by byte; Foundation's search for a scheme cost 2% of a request.
    static func path(of target: String) -> Substring {
        var rest = Substring(target)
        if !Self.isOriginForm(target), let scheme = rest.range(of: "://") {
            rest = rest[scheme.upperBound...]
            rest = rest[(rest.firstIndex(of: "/") ?? rest.endIndex)...]
        }
        let end = rest.utf8.firstIndex { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") } ?? rest.endIndex
        return rest[..<end]
    }

    static func isOriginForm(_ target: String) -> Bool { target.utf8.first == UInt8(ascii: "/") }

    /// As NIOHTTPTypesHTTP1's `HTTPRequest(_:secure:splitCookie:)`, which parses every target with Foundation's
    /// `URLComponents` (2% of a request's CPU), only to keep an origin-form target as it is. Other forms go to it.
    static func request(_ head: HTTPRequestHead, secure: Bool) throws -> HTTPRequest {
        guard isOriginForm(head.uri) else { return try HTTPRequest(head, secure: secure, splitCookie: false) }
        return HTTPRequest(
            method: try HTTPRequest.Method(head.method),
            scheme: secure ? "https" : "http",
            authority: head.headers["Host"].first,
            path: head.uri,
            headerFields: HTTPFields(head.headers, splitCookie: false)
        )
    }

    /// Hands the request to the responder from its head. Until the request ends, its body is read meanwhile (when
    /// `body` is arriving), or dropped: a body too large is not passed on, and the client, still sending, reads the
    /// refusal rather than a reset. `withheld`: the client waits for a `100 Continue` it was refused, so it sends no
    /// body and its request is over; the connection closes after the answer.
    private func dispatch(
        _ head: HTTPRequestHead,
        body: RequestBody,
        withheld: Bool = false,
        context: ChannelHandlerContext
    ) {
        let closeAfter = withheld || !head.isKeepAlive
        state = .answering(requestEnded: withheld, closeAfter: closeAfter)
        exchanges += 1
        let number = exchanges
        let request: Request
        do {
            guard head.method != .CONNECT else { throw BridgeError.malformedRequest }
            request = Request(head: try Self.request(head, secure: secure), body: .init(buffer: ByteBuffer()))
        } catch {
            // CONNECT (a proxy's method: NIO's encoder would frame its answer as a tunnel), or a method HTTP's types
            // refuse.
            state = .answering(requestEnded: withheld, closeAfter: true)
            let exchange = ExchangeWriter(
                handler: self,
                context: context,
                number: number,
                version: head.version,
                closeAfter: true
            )
            exchange.refuse(.malformedRequest)
            return
        }
        let exchange = ExchangeWriter(
            handler: self,
            context: context,
            number: number,
            version: head.version,
            closeAfter: closeAfter
        )
        let requestContext = BridgeRequestContext(
            remoteAddress: context.channel.remoteAddress,
            channel: context.channel,
            body: body
        )
        let responder = self.responder
        loopLoad.started()
        answers[number] = Task(executorPreference: taskExecutor) {
            await exchange.write(await responder.respond(to: request, context: requestContext))
        }
    }

    /// Just before the answer's last part is written: what comes next for the connection. Set first, because
    /// writing the end lets the pipeline handler deliver the next request at once, re-entering `channelRead`.
    /// `mustClose`: the answer itself ends only with the connection (a stream over HTTP/1.0).
    fileprivate func answerEnding(mustClose: Bool) -> Bool {
        // An answer that did not wait for the body (a refused subkey): the rest of it is dropped.
        abandonBody()
        guard case .answering(let requestEnded, let closeAfter) = state else {
            if case .closed = state { return true }
            state = .closing
            return true
        }
        if mustClose || (closeAfter && requestEnded) {
            state = .closing
            return true
        }
        if !requestEnded {
            state = .draining(closeAfter: closeAfter)
            return false
        }
        state = .idle
        lastActivity = .now()
        return false
    }

    /// Where the answer's end went, so that a later close waits for it.
    fileprivate func answerEnded(_ written: EventLoopFuture<Void>) {
        lastEnd = written
    }

    /// The answer's task is over (written whole, or given up when the client went).
    fileprivate func answerDone(number: Int, context: ChannelHandlerContext, complete: Bool) {
        if answers.removeValue(forKey: number) != nil { loopLoad.ended() }
        // An earlier exchange's task ending has no say over the connection: its end was written, or the next
        // request would not have come.
        if number == exchanges {
            switch state {
            case .closed:
                break
            case .answering:
                // The end was never written: the client cannot tell where this answer stops, so the connection goes.
                close(context: context)
            case .idle, .draining, .closing:
                if !complete { close(context: context) }
            }
        }
        if case .closed = state, answers.isEmpty { leave() }
    }

    /// The body still arriving is not wanted any more, or will never be whole: its promise is kept with a 400.
    private func abandonBody() {
        guard let (_, promise) = arriving else { return }
        arriving = nil
        promise.fail(BridgeError.malformedRequest)
    }

    private var tooLarge: BridgeError { .requestTooLarge(limit: bodyLimit) }

    private func leave() {
        if let connectionID { connections.remove(connectionID) }
        connectionID = nil
    }

    /// Closes the connection once the last answer's end is out (closing drops writes still queued).
    /// A client that stops reading holds the end back: after `idleTimeout` the connection closes anyway.
    fileprivate func close(context: ChannelHandlerContext) {
        if case .closed = state { return }
        abandonBody()
        if case .answering = state {
            state = .answering(requestEnded: true, closeAfter: true)
        } else {
            state = .closing
        }
        guard let lastEnd else { return context.close(promise: nil) }
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        let overdue = context.eventLoop.scheduleTask(in: idleTimeout) { bound.value.close(promise: nil) }
        lastEnd.whenComplete { _ in
            overdue.cancel()  // else it would hold the connection for the whole timeout
            bound.value.close(promise: nil)
        }
    }

    /// The listener is stopping for good: the answer in progress is cancelled and the connection closed.
    private func abort(context: ChannelHandlerContext) {
        for answer in answers.values { answer.cancel() }
        if case .closed = state { return }
        context.close(promise: nil)
    }

    // MARK: Idle connections

    private func armIdleCheck(context: ChannelHandlerContext) {
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        idleCheck = context.eventLoop.scheduleTask(deadline: lastActivity + idleTimeout) {
            handler.value.idleCheckFired(context: bound.value)
        }
    }

    private func idleCheckFired(context: ChannelHandlerContext) {
        idleCheck = nil
        switch state {
        case .closed:
            return
        case .closing,
            .answering where arriving == nil:
            // An answer in progress (or a last one going out) is not idleness, unless its client stopped reading.
            if stalled(context: context) {
                context.close(promise: nil)  // what waits to go out is dropped: it would never be read
                return
            }
            lastActivity = .now()
        case .idle, .answering, .draining:
            if NIODeadline.now() >= lastActivity + idleTimeout {
                close(context: context)
                return
            }
        }
        armIdleCheck(context: context)
    }

    /// Whether bytes have waited to go out since the last check without any being taken, while nothing more was
    /// written: the client has stopped reading. (A streamed answer writes its next part only once the last is out,
    /// so new parts mean the client read; an answer written whole can only shrink while it is read.)
    private func stalled(context: ChannelHandlerContext) -> Bool {
        let buffered = (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
        guard buffered > 0 else {
            stallMark = nil
            return false
        }
        defer { stallMark = (partsWritten, buffered) }
        guard let mark = stallMark else { return false }
        return mark.parts == partsWritten && buffered >= mark.buffered
    }
}

/// Writes one answer to its connection, from the answer's task: on the connection's event loop (at once when the
/// task runs there, as it does when NIO's loops run Swift concurrency, else by a hop). A body of known length is
/// flushed once, with its end; a streamed body is flushed part by part, each write awaited so that a slow client
/// holds the stream back instead of filling memory.
struct ExchangeWriter: Sendable {
    private let handler: NIOLoopBound<ExchangeHandler>
    private let context: NIOLoopBound<ChannelHandlerContext>
    private let number: Int
    private let version: HTTPVersion
    private let closeAfter: Bool

    init(handler: ExchangeHandler, context: ChannelHandlerContext, number: Int, version: HTTPVersion, closeAfter: Bool) {
        self.handler = NIOLoopBound(handler, eventLoop: context.eventLoop)
        self.context = NIOLoopBound(context, eventLoop: context.eventLoop)
        self.number = number
        self.version = version
        self.closeAfter = closeAfter
    }

    private var eventLoop: any EventLoop { context.eventLoop }

    /// Runs `body` on the connection's event loop.
    private func onLoop<T: Sendable>(_ body: @escaping @Sendable () -> EventLoopFuture<T>) -> EventLoopFuture<T> {
        eventLoop.inEventLoop ? body() : eventLoop.flatSubmit(body)
    }

    func write(_ answer: BridgeResponder.Answer) async {
        let response = answer.response
        let streamed = response.body.contentLength == nil
        let head = self.head(of: response, streamed: streamed)
        _ = onLoop { [handler, context, number] in
            guard handler.value.mayWrite(number) else { return context.value.eventLoop.makeSucceededVoidFuture() }
            handler.value.writingHead(number)
            handler.value.partsWritten += 1
            context.value.write(NIOAny(HTTPServerResponsePart.head(head)), promise: nil)
            // A stream's head can go out with its first chunk when Circuit sent that with its own head (if the chunk
            // is written before the loop's next turn), else it goes on that turn: never held for Circuit's first event.
            if streamed { context.value.eventLoop.execute { context.value.flush() } }
            return context.value.eventLoop.makeSucceededVoidFuture()
        }
        var complete = true
        do {
            try await response.body.write(BodyWriter(exchange: self, flushesEachPart: streamed))
        } catch {
            complete = false
        }
        answer.written?()
        _ = onLoop { [handler, context, number, complete] in
            handler.value.answerDone(number: number, context: context.value, complete: complete)
            return context.value.eventLoop.makeSucceededVoidFuture()
        }
    }

    /// The handler's own refusal, written at once on the event loop.
    func refuse(_ error: BridgeError) {
        let head = self.head(of: error.response(), streamed: false)
        handler.value.writingHead(number)
        context.value.write(NIOAny(HTTPServerResponsePart.head(head)), promise: nil)
        _ = writePart(ByteBuffer(bytes: error.body), flush: false)
        _ = writeEnd(nil, streamed: false)
    }

    private func head(of response: Response, streamed: Bool) -> HTTPResponseHead {
        var head = HTTPResponseHead(response.head)
        head.version = version
        head.headers.replaceOrAdd(name: "date", value: HTTPDate.now())
        // HTTP/1.0 knows no chunked encoding: a streamed answer ends with the connection.
        if closeAfter || (streamed && version.minor == 0) {
            head.headers.replaceOrAdd(name: "connection", value: "close")
        } else if version.minor == 0 {
            head.headers.replaceOrAdd(name: "connection", value: "keep-alive")
        }
        return head
    }

    fileprivate func writePart(_ buffer: ByteBuffer, flush: Bool) -> EventLoopFuture<Void> {
        onLoop { [handler, context, number] in
            let context = context.value
            guard handler.value.mayWrite(number) else {
                return context.eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel)
            }
            handler.value.partsWritten += 1
            if flush { return context.writeAndFlush(NIOAny(HTTPServerResponsePart.body(.byteBuffer(buffer)))) }
            context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(buffer))), promise: nil)
            return context.eventLoop.makeSucceededVoidFuture()
        }
    }

    /// The answer's last part; then the connection closes if it must (`streamed` over HTTP/1.0: only the close
    /// tells where such an answer ends).
    fileprivate func writeEnd(_ trailers: HTTPFields?, streamed: Bool) -> EventLoopFuture<Void> {
        onLoop { [handler, context, version, number] in
            guard handler.value.mayWrite(number) else {
                return context.value.eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel)
            }
            handler.value.partsWritten += 1
            let closes = handler.value.answerEnding(mustClose: streamed && version.minor == 0)
            // Noted before writing: the write can deliver the next request, and a close it causes must wait.
            let promise = context.value.eventLoop.makePromise(of: Void.self)
            handler.value.answerEnded(promise.futureResult)
            context.value.writeAndFlush(NIOAny(HTTPServerResponsePart.end(trailers.map(HTTPHeaders.init))), promise: promise)
            let written = promise.futureResult
            if closes {
                written.whenComplete { _ in handler.value.close(context: context.value) }
            }
            return written
        }
    }
}

/// The body's parts as the responder writes them.
private struct BodyWriter: ResponseBodyWriter {
    let exchange: ExchangeWriter
    let flushesEachPart: Bool

    mutating func write(_ buffer: ByteBuffer) async throws {
        let written = exchange.writePart(buffer, flush: flushesEachPart)
        if flushesEachPart { try await written.get() }
    }

    consuming func finish(_ trailingHeaders: HTTPFields?) async throws {
        try await exchange.writeEnd(trailingHeaders, streamed: flushesEachPart).get()
    }
}
