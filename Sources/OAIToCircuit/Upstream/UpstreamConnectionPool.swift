import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS

/// Keep-alive HTTP/1.1 connections to Circuit, kept per event loop.
///
/// A request takes a connection of the event loop its task runs on. With NIO's loops as Swift concurrency's
/// executor (the executable installs them at start), the client's connection, the task and Circuit's connection are
/// then on one thread, and a chat exchange crosses no thread at all. Each loop's share of the pool is touched only
/// on that loop, so it needs no lock. The loops' shares of `UPSTREAM_MAX_CONNECTIONS` add up to it exactly (with
/// fewer connections than loops, a loop without a share sends its requests to the first). Requests beyond
/// that wait, in order, for a connection to come free; that wait counts against the read timeout for the head.
///
/// A non-streamed answer is read whole inside the connection's handler and handed over at once; a stream is handed
/// over as it arrives, with backpressure: reading from Circuit pauses while the client is behind.
final class UpstreamConnectionPool: Sendable {
    struct Settings: Sendable {
        var connectTimeout: TimeAmount = .seconds(10)
        /// The longest wait for an answer's head, from the request's start (a wait for a connection included), and
        /// the longest silence between two of its chunks.
        var readTimeout: TimeAmount
        /// How long a connection may sit unused before it is closed.
        var idleTimeout: TimeAmount = .seconds(60)
        var maximumConnections: Int
    }

    private let loops: [ObjectIdentifier: LoopPool]
    /// Where a loop without a share of the connections sends its requests.
    private let lender: LoopPool
    private let group: any EventLoopGroup

    /// `tls`: how to check Circuit's certificate when `endpoint` is HTTPS (by default, the system's trust roots).
    init(
        endpoint: UpstreamEndpoint,
        settings: Settings,
        tls: TLSConfiguration? = nil,
        group: MultiThreadedEventLoopGroup = .singleton
    ) throws {
        var context: NIOSSLContext?
        if endpoint.usesTLS { context = try NIOSSLContext(configuration: tls ?? .makeClientConfiguration()) }
        var members: [any EventLoop] = []
        for loop in group.makeIterator() { members.append(loop) }
        // The limit is shared out exactly, so the loops together never hold more than it: with fewer connections
        // than loops, some loops hold none and send their requests to one that does.
        let limit = max(1, settings.maximumConnections)
        var loops: [ObjectIdentifier: LoopPool] = [:]
        for (index, loop) in members.enumerated() {
            let share = limit / members.count + (index < limit % members.count ? 1 : 0)
            loops[ObjectIdentifier(loop)] = LoopPool(
                loop: loop,
                endpoint: endpoint,
                tls: context,
                settings: settings,
                limit: share
            )
        }
        self.loops = loops
        // The first loop always has a share (the remainder goes to the first loops).
        self.lender = loops[ObjectIdentifier(members[0])]!
        self.group = group
    }

    /// Sends `request` and returns Circuit's answer: whole when it is not an event stream (up to `collectLimit`
    /// bytes), else as a stream. Cancelling the task abandons the exchange and closes its connection.
    func execute(_ request: UpstreamRequest, collectLimit: Int) async throws(UpstreamError) -> UpstreamResponse {
        let home =
            MultiThreadedEventLoopGroup.currentEventLoop.flatMap { loops[ObjectIdentifier($0)] }
            ?? loops[ObjectIdentifier(group.any())]!
        let pool = home.limit > 0 ? home : lender
        let call = UpstreamCall(
            request: request,
            collectLimit: collectLimit,
            headDeadline: .now() + pool.readTimeout,
            promise: pool.loop.makePromise()
        )
        if pool.loop.inEventLoop {
            pool.start(call)
        } else {
            pool.loop.execute { pool.start(call) }
        }
        do {
            return try await withTaskCancellationHandler {
                try await call.promise.futureResult.get()
            } onCancel: {
                pool.loop.execute { pool.cancel(call) }
            }
        } catch let error as UpstreamError {
            throw error
        } catch {
            throw .connectionClosed(String(describing: type(of: error)))
        }
    }

    /// Each loop's share of the connection limit (for tests).
    var shares: [Int] { loops.values.map(\.limit).sorted() }

    /// Closes idle connections and refuses new requests; exchanges under way finish.
    func shutdown() async {
        for pool in loops.values {
            try? await pool.loop.submit { pool.shutdown() }.get()
        }
    }
}

/// One chat request as Circuit gets it.
struct UpstreamRequest: Sendable {
    var head: HTTPRequestHead
    var body: ByteBuffer
}

/// Circuit's answer: its head, and its body whole or as a stream.
struct UpstreamResponse: Sendable {
    var status: HTTPResponseStatus
    var headers: HTTPHeaders
    var body: Body

    enum Body: Sendable {
        case complete(ByteBuffer)
        case stream(UpstreamBody)
        /// Circuit answered, but its (non-streamed) body did not arrive whole.
        case broken(UpstreamError)
    }
}

/// Why an exchange with Circuit failed. The descriptions name the transport failure only (never a header).
enum UpstreamError: Error, Equatable, CustomStringConvertible {
    /// No connection could be made (refused, unresolvable, TLS handshake failed).
    case connectFailed(String)
    /// Circuit was silent for longer than the read timeout, or no connection came free within it.
    case timedOut
    /// The connection ended or broke before the answer did.
    case connectionClosed(String)
    /// A non-streamed answer larger than the bridge holds.
    case answerTooLarge
    case cancelled
    case shutDown

    var description: String {
        switch self {
        case .connectFailed(let reason): "cannot connect: \(reason)"
        case .timedOut: "timed out"
        case .connectionClosed(let reason): "connection closed: \(reason)"
        case .answerTooLarge: "answer too large"
        case .cancelled: "cancelled"
        case .shutDown: "client shut down"
        }
    }
}

/// One request on its way: waiting for a connection, then on one.
private final class UpstreamCall: @unchecked Sendable {
    let request: UpstreamRequest
    let collectLimit: Int
    /// When the wait for Circuit's answer head ends, counted from the request's start: waiting in the queue,
    /// connecting and Circuit's silence share one `UPSTREAM_TIMEOUT_SECONDS`, as the operator reads the setting.
    let headDeadline: NIODeadline
    let promise: EventLoopPromise<UpstreamResponse>
    /// Loop-confined from here on.
    var connection: UpstreamConnection?
    var waitTimer: Scheduled<Void>?
    var isDone = false
    /// Sent again once already, after a reused connection closed under it.
    var isRetry = false

    init(
        request: UpstreamRequest,
        collectLimit: Int,
        headDeadline: NIODeadline,
        promise: EventLoopPromise<UpstreamResponse>
    ) {
        self.request = request
        self.collectLimit = collectLimit
        self.headDeadline = headDeadline
        self.promise = promise
    }

    func fail(_ error: UpstreamError) {
        guard !isDone else { return }
        isDone = true
        waitTimer?.cancel()
        promise.fail(error)
    }

    func succeed(_ response: UpstreamResponse) {
        guard !isDone else { return }
        isDone = true
        promise.succeed(response)
    }
}

/// One event loop's connections. Every member is touched on `loop` only.
private final class LoopPool: @unchecked Sendable {
    let loop: any EventLoop
    private let endpoint: UpstreamEndpoint
    private let tls: NIOSSLContext?
    private let settings: UpstreamConnectionPool.Settings
    /// This loop's share of `UPSTREAM_MAX_CONNECTIONS` (0 when there are fewer connections than loops).
    let limit: Int
    /// Most recently used last, so the warmest connection is taken first and the coldest time out.
    private var idle: [UpstreamConnection] = []
    /// Connections open or being opened.
    private var open = 0
    private var waiting = CircularBuffer<UpstreamCall>()
    private var sweep: Scheduled<Void>?
    private var isShutDown = false

    init(
        loop: any EventLoop,
        endpoint: UpstreamEndpoint,
        tls: NIOSSLContext?,
        settings: UpstreamConnectionPool.Settings,
        limit: Int
    ) {
        self.loop = loop
        self.endpoint = endpoint
        self.tls = tls
        self.settings = settings
        self.limit = limit
    }

    var readTimeout: TimeAmount { settings.readTimeout }

    func start(_ call: UpstreamCall) {
        guard !isShutDown else { return call.fail(.shutDown) }
        guard !call.isDone else { return }
        let now = NIODeadline.now()
        while let connection = idle.popLast() {
            if connection.isUsable(now: now, idleTimeout: settings.idleTimeout) {
                return connection.send(call)
            }
            connection.close()
        }
        if open < limit { return connect(for: call) }
        call.waitTimer = loop.scheduleTask(deadline: call.headDeadline) { [self] in
            waiting.removeAll { $0 === call }
            call.fail(.timedOut)
        }
        waiting.append(call)
    }

    func cancel(_ call: UpstreamCall) {
        guard !call.isDone else { return }
        waiting.removeAll { $0 === call }
        call.fail(.cancelled)
        call.connection?.abandon()
    }

    private func connect(for call: UpstreamCall) {
        open += 1
        let endpoint = endpoint
        let tls = tls
        let readTimeout = settings.readTimeout
        ClientBootstrap(group: loop)
            .connectTimeout(settings.connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                do {
                    if let tls {
                        let name = endpoint.hostIsAddress ? nil : endpoint.host
                        try channel.pipeline.syncOperations.addHandler(
                            try NIOSSLClientHandler(context: tls, serverHostname: name)
                        )
                    }
                    try channel.pipeline.syncOperations.addHTTPClientHandlers(leftOverBytesStrategy: .dropBytes)
                    // One handler per channel: connecting by name may try several addresses, each on a channel of
                    // its own, and only the one that wins is used.
                    try channel.pipeline.syncOperations.addHandler(
                        UpstreamConnection(pool: self, readTimeout: readTimeout, usesTLS: tls != nil)
                    )
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
            .connect(host: endpoint.host, port: endpoint.port)
            .whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    guard let connection = try? channel.pipeline.syncOperations.handler(type: UpstreamConnection.self)
                    else {
                        open -= 1
                        call.fail(.connectFailed("no connection handler"))
                        channel.close(promise: nil)
                        return
                    }
                    channel.closeFuture.whenComplete { _ in self.closed(connection) }
                    if isShutDown {
                        call.fail(.shutDown)
                        connection.close()
                    } else if call.isDone {
                        // Cancelled or timed out while connecting: the connection serves the next request.
                        release(connection)
                    } else {
                        connection.send(call)
                    }
                case .failure(let error):
                    open -= 1
                    call.fail(.connectFailed(Self.describe(error)))
                    // A waiting request might get through on another attempt of its own.
                    if let next = takeWaiting() { connect(for: next) }
                }
            }
    }

    /// An exchange ended cleanly on a connection that can be used again.
    func release(_ connection: UpstreamConnection) {
        guard !isShutDown else { return connection.close() }
        if let next = takeWaiting() { return connection.send(next) }
        connection.idleSince = .now()
        idle.append(connection)
        if sweep == nil {
            sweep = loop.scheduleTask(in: settings.idleTimeout) { [self] in sweepIdle() }
        }
    }

    private func closed(_ connection: UpstreamConnection) {
        open -= 1
        idle.removeAll { $0 === connection }
        if !isShutDown, open < limit, let next = takeWaiting() { connect(for: next) }
    }

    private func takeWaiting() -> UpstreamCall? {
        while let call = waiting.popFirst() {
            guard !call.isDone else { continue }
            call.waitTimer?.cancel()
            call.waitTimer = nil
            return call
        }
        return nil
    }

    private func sweepIdle() {
        sweep = nil
        let now = NIODeadline.now()
        for connection in idle where !connection.isUsable(now: now, idleTimeout: settings.idleTimeout) {
            connection.close()
        }
        if !idle.isEmpty {
            sweep = loop.scheduleTask(in: settings.idleTimeout) { [self] in sweepIdle() }
        }
    }

    func shutdown() {
        isShutDown = true
        sweep?.cancel()
        sweep = nil
        for connection in idle { connection.close() }
        while let call = waiting.popFirst() { call.fail(.shutDown) }
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? ChannelError, case .connectTimeout = error { return "connect timeout" }
        if let error = error as? IOError { return error.description }
        if error is NIOSSLError || error is NIOSSLExtraError { return String(describing: error) }
        if let error = error as? NIOConnectionError {
            return error.connectionErrors.first.map { "\($0.error)" } ?? "\(error.dnsAAAAError ?? error.dnsAError ?? error)"
        }
        return String(describing: type(of: error))
    }
}

/// One connection to Circuit: sends a call's request and reads its answer, then goes back to its pool.
private final class UpstreamConnection: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundIn = HTTPClientRequestPart
    typealias OutboundOut = HTTPClientRequestPart

    private enum Phase {
        case idle
        case awaitingHead(UpstreamCall)
        case collecting(UpstreamCall, HTTPResponseHead, ByteBuffer)
        case streaming(UpstreamStream)
    }

    private let pool: LoopPool
    private let readTimeout: TimeAmount
    private var context: ChannelHandlerContext?
    private var phase = Phase.idle
    private var keepAlive = true
    private var isClosed = false
    /// A read the pipeline asked for, held back while the client is behind.
    private var heldRead = false
    private var lastActivity = NIODeadline.now()
    private var timer: Scheduled<Void>?
    private var timerDeadline = NIODeadline.distantFuture
    /// Until TLS is up, a failure means the connection could not be made.
    private var isEstablished: Bool
    /// Exchanges this connection finished: a reused connection may have been closed by Circuit while idle.
    private var finished = 0
    /// When the request under way was sent.
    private var sentAt = NIODeadline.now()
    var idleSince = NIODeadline.now()

    init(pool: LoopPool, readTimeout: TimeAmount, usesTLS: Bool) {
        self.pool = pool
        self.readTimeout = readTimeout
        self.isEstablished = !usesTLS
    }

    func isUsable(now: NIODeadline, idleTimeout: TimeAmount) -> Bool {
        guard let context, !isClosed, context.channel.isActive else { return false }
        return now < idleSince + idleTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func send(_ call: UpstreamCall) {
        guard let context, !isClosed else {
            call.fail(.connectionClosed("closed before the request"))
            return
        }
        call.connection = self
        phase = .awaitingHead(call)
        keepAlive = true
        heldRead = false
        touch()
        sentAt = lastActivity
        // The head is due by the call's deadline (its time in the queue and connecting counted), which is never
        // later than a read timeout from now; a timer left by the previous exchange may be later.
        if timer == nil || timerDeadline > call.headDeadline {
            timer?.cancel()
            schedule(at: call.headDeadline)
        }
        context.write(wrapOutboundOut(.head(call.request.head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(call.request.body))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        touch()
        switch (unwrapInboundIn(data), phase) {
        case (.head(let head), .awaitingHead(let call)):
            if head.status.code < 200, head.status != .switchingProtocols { return }  // 100 Continue and friends
            keepAlive = head.isKeepAlive
            if Self.isEventStream(head) {
                let stream = UpstreamStream(loop: context.eventLoop, connection: self)
                phase = .streaming(stream)
                call.succeed(
                    UpstreamResponse(status: head.status, headers: head.headers, body: .stream(UpstreamBody(stream: stream)))
                )
            } else {
                let announced = head.headers.first(name: "content-length").flatMap { Int($0) } ?? 0
                phase = .collecting(call, head, context.channel.allocator.buffer(capacity: min(announced, 1 << 20)))
                if announced > call.collectLimit { return fail(.answerTooLarge) }
            }
        case (.body(let chunk), .collecting(let call, let head, var buffer)):
            guard buffer.readableBytes + chunk.readableBytes <= call.collectLimit else { return fail(.answerTooLarge) }
            phase = .idle  // lets `buffer` be uniquely referenced while it grows
            buffer.writeImmutableBuffer(chunk)
            phase = .collecting(call, head, buffer)
        case (.body(let chunk), .streaming(let stream)):
            stream.receive(chunk)
        case (.end, .collecting(let call, let head, let buffer)):
            finishExchange()
            call.succeed(UpstreamResponse(status: head.status, headers: head.headers, body: .complete(buffer)))
        case (.end, .streaming(let stream)):
            finishExchange()
            stream.finish()
        default:
            // An answer nobody asked for: the connection's state is unknown, so it goes.
            fail(.connectionClosed("unexpected data from Circuit"))
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event { isEstablished = true }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A TLS peer that just closes (no close_notify) is a close: the decoder and `channelInactive` judge it.
        if isEstablished, let error = error as? NIOSSLError, case .uncleanShutdown = error { return }
        let reason = LoopPool.describe(error)
        guard isEstablished else { return fail(.connectFailed("TLS: \(reason)")) }
        fail(.connectionClosed(reason), mayRetry: Self.isReset(error))
    }

    func channelInactive(context: ChannelHandlerContext) {
        isClosed = true
        fail(.connectionClosed("closed by Circuit"), mayRetry: true)
        context.fireChannelInactive()
    }

    func read(context: ChannelHandlerContext) {
        if case .streaming(let stream) = phase, !stream.wantsMore {
            heldRead = true
            return
        }
        context.read()
    }

    /// The client has caught up: reading from Circuit goes on.
    func resumeReading() {
        guard heldRead, let context else { return }
        heldRead = false
        context.read()
    }

    /// The caller gave up on an exchange under way: its connection cannot be reused.
    func abandon() {
        switch phase {
        case .idle: return
        case .awaitingHead, .collecting, .streaming: fail(.cancelled)
        }
    }

    func close() {
        guard !isClosed else { return }
        isClosed = true
        timer?.cancel()
        timer = nil
        context?.close(promise: nil)
    }

    /// The read timer stays: it fires at most once more, finds the connection idle, and stops (cheaper than
    /// cancelling and scheduling one per request).
    private func finishExchange() {
        phase = .idle
        finished += 1
        heldRead = false
        // An answer that ended with the connection (no length) leaves it closing before `channelInactive` says so.
        if keepAlive, !isClosed, context?.channel.isActive == true { pool.release(self) } else { close() }
    }

    /// How soon after sending a close may be Circuit's idle timeout crossing the request rather than an answer to
    /// it: about a round trip.
    static let retryWindow = TimeAmount.milliseconds(250)

    /// Ends the exchange under way with `error` and closes the connection.
    ///
    /// `mayRetry`: the connection closed or was reset (not a malformed answer). A request is sent again only when
    /// the connection was a reused one, nothing of an answer came, and the close followed the sending at once:
    /// Circuit's keep-alive timeout crossing the request. A close later than that may come after Circuit started
    /// work on it, and a chat request is never sent twice for that.
    private func fail(_ error: UpstreamError, mayRetry: Bool = false) {
        let current = phase
        phase = .idle
        switch current {
        case .idle: break
        case .awaitingHead(let call)
        where mayRetry && finished > 0 && !call.isRetry && NIODeadline.now() - sentAt < Self.retryWindow:
            call.isRetry = true
            call.connection = nil
            close()
            pool.start(call)
            return
        case .awaitingHead(let call): call.fail(error)
        case .collecting(let call, let head, _):
            call.succeed(UpstreamResponse(status: head.status, headers: head.headers, body: .broken(error)))
        case .streaming(let stream): stream.fail(error)
        }
        close()
    }

    /// A reset or broken pipe: the peer closed the connection (not a protocol or TLS failure).
    private static func isReset(_ error: any Error) -> Bool {
        guard let error = error as? IOError else { return false }
        return [ECONNRESET, EPIPE].contains(error.errnoCode)
    }

    private func touch() {
        lastActivity = .now()
    }

    /// One timer per exchange, moved forward lazily: it fires at most once per read timeout, not once per chunk.
    private func schedule(at deadline: NIODeadline) {
        guard let context else { return }
        timerDeadline = deadline
        timer = context.eventLoop.scheduleTask(deadline: deadline) { [self] in
            timer = nil
            if case .idle = phase { return }
            // Waiting for a slow client is not Circuit's silence.
            if heldRead, case .streaming = phase { touch() }
            var due = lastActivity + readTimeout
            if case .awaitingHead(let call) = phase { due = min(due, call.headDeadline) }
            if due > .now() { schedule(at: due) } else { fail(.timedOut) }
        }
    }

    private static func isEventStream(_ head: HTTPResponseHead) -> Bool {
        guard let type = head.headers.first(name: "content-type") else { return false }
        return type.utf8.count >= 17 && type.lowercased().hasPrefix("text/event-stream")
    }
}

/// A streamed answer's body as it arrives, read by one consumer. Loop-confined, except `next` and `cancel`.
final class UpstreamStream: @unchecked Sendable {
    /// Above this many bytes unread by the client, reading from Circuit pauses.
    static let highWater = 256 << 10

    private let loop: any EventLoop
    private var chunks = CircularBuffer<ByteBuffer>()
    private var buffered = 0
    private var ended = false
    private var failure: UpstreamError?
    private var waiter: EventLoopPromise<ByteBuffer?>?
    /// While Circuit is still sending.
    private var connection: UpstreamConnection?

    fileprivate init(loop: any EventLoop, connection: UpstreamConnection) {
        self.loop = loop
        self.connection = connection
    }

    fileprivate var wantsMore: Bool { buffered < Self.highWater }

    fileprivate func receive(_ chunk: ByteBuffer) {
        if let waiter {
            self.waiter = nil
            waiter.succeed(chunk)
        } else {
            chunks.append(chunk)
            buffered += chunk.readableBytes
        }
    }

    fileprivate func finish() {
        ended = true
        connection = nil
        waiter?.succeed(nil)
        waiter = nil
    }

    fileprivate func fail(_ error: UpstreamError) {
        guard !ended, failure == nil else { return }
        failure = error
        connection = nil
        waiter?.fail(error)
        waiter = nil
    }

    /// The next bytes (everything that has arrived since the last call), or `nil` at the end.
    func next() async throws(UpstreamError) -> ByteBuffer? {
        let future = loop.inEventLoop ? nextNow() : loop.flatSubmit { self.nextNow() }
        do {
            return try await withTaskCancellationHandler {
                try await future.get()
            } onCancel: {
                self.cancel()
            }
        } catch let error as UpstreamError {
            throw error
        } catch {
            throw .connectionClosed(String(describing: type(of: error)))
        }
    }

    private func nextNow() -> EventLoopFuture<ByteBuffer?> {
        if var first = chunks.popFirst() {
            // Whatever else has arrived goes along: one write to the client instead of several.
            while let more = chunks.popFirst() { first.writeImmutableBuffer(more) }
            buffered = 0
            connection?.resumeReading()
            return loop.makeSucceededFuture(first)
        }
        if let failure { return loop.makeFailedFuture(failure) }
        if ended { return loop.makeSucceededFuture(nil) }
        let promise = loop.makePromise(of: ByteBuffer?.self)
        waiter = promise
        connection?.resumeReading()
        return promise.futureResult
    }

    /// Gives up on the rest: Circuit's connection is closed (it cannot be reused mid-answer).
    func cancel() {
        loop.execute {
            guard !self.ended, self.failure == nil else { return }
            let connection = self.connection
            self.fail(.cancelled)
            connection?.abandon()
        }
    }
}

/// The body of a streamed answer, for `for try await`.
struct UpstreamBody: AsyncSequence, Sendable {
    typealias Element = ByteBuffer
    let stream: UpstreamStream

    struct Iterator: AsyncIteratorProtocol {
        let stream: UpstreamStream
        mutating func next() async throws -> ByteBuffer? { try await stream.next() }
    }

    func makeAsyncIterator() -> Iterator { Iterator(stream: stream) }

    func cancel() { stream.cancel() }
}
