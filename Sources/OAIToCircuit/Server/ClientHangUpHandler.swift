import NIOCore
import Synchronization

/// Tells a stream when its client stops sending (TCP FIN) or disconnects. The server allows half-closed
/// connections, so the channel stays active and a stream waiting for Circuit's next chunk would only learn at its
/// next write that nobody listens, keeping Circuit working for a client that left. A stream registers a callback
/// with `watch` instead (see `Accounting.relay`); other requests are unaffected, so a client that half-closes after
/// sending still gets its answer.
final class ClientHangUpHandler: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = NIOAny

    private struct State {
        var hungUp = false
        var watcher: (@Sendable () -> Void)?
    }

    private let state = Mutex(State())

    var hasHungUp: Bool { state.withLock { $0.hungUp } }

    /// Calls `onHangUp` once when the client goes (at once if it has gone already). One watcher at a time: an
    /// HTTP/1 connection carries one answer at a time.
    func watch(_ onHangUp: @escaping @Sendable () -> Void) {
        let gone = state.withLock { state in
            if !state.hungUp { state.watcher = onHangUp }
            return state.hungUp
        }
        if gone { onHangUp() }
    }

    func unwatch() {
        state.withLock { $0.watcher = nil }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { hangUp() }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        hangUp()
        context.fireChannelInactive()
    }

    private func hangUp() {
        let watcher = state.withLock { state in
            state.hungUp = true
            defer { state.watcher = nil }
            return state.watcher
        }
        watcher?()
    }

    /// The handler in `channel`'s pipeline (without a hop when called on its event loop).
    static func of(_ channel: any Channel) async -> ClientHangUpHandler? {
        if channel.eventLoop.inEventLoop {
            return try? channel.pipeline.syncOperations.handler(type: ClientHangUpHandler.self)
        }
        return try? await channel.pipeline.handler(type: ClientHangUpHandler.self).get()
    }
}
