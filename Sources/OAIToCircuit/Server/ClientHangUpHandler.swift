import NIOCore
import Synchronization

/// Notes when a client stops sending (TCP FIN). Hummingbird allows half-closed connections, so the channel stays
/// active and a stream waiting for Circuit's next chunk would only learn at its next write that nobody listens,
/// keeping Circuit working for a client that left. Streams poll `hasHungUp` instead (see `Accounting.relay`);
/// other requests are unaffected, so a client that half-closes after sending still gets its answer.
final class ClientHangUpHandler: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = NIOAny

    private let hungUp = Atomic<Bool>(false)

    var hasHungUp: Bool { hungUp.load(ordering: .relaxed) }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { hungUp.store(true, ordering: .relaxed) }
        context.fireUserInboundEventTriggered(event)
    }
}
