import Foundation
import Logging
import NIOCore
import NIOExtras
import NIOHTTP1
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

/// One listening socket, HTTP or HTTPS, serving HTTP/1.1 through `ExchangeHandler`.
///
/// Graceful shutdown closes the socket at once, lets every request in progress finish (an idle keep-alive
/// connection closes now, a busy one after its answer, with `Connection: close`), and returns when the last
/// connection has gone. Cancellation (the grace period is over) cancels the answers still running and closes their
/// connections.
struct HTTPListener: Sendable {
    let host: String
    let port: Int
    let tls: NIOSSLContext?
    let responder: BridgeResponder
    let bodyLimit: Int
    let idleTimeout: TimeAmount
    let logger: Logger

    func run(onListening: @escaping @Sendable (Int) async -> Void) async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let quiescing = ServerQuiescingHelper(group: group)
        let connections = ConnectionSet()
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(quiescing.makeServerChannelHandler(channel: channel))
                }
            }
            // A client that half-closes after sending its request still gets the answer.
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture { try configure(channel, connections: connections) }
            }
            .bind(host: host, port: port)
            .get()
        await onListening(server.localAddress?.port ?? port)

        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                try? await server.closeFuture.get()
            } onGracefulShutdown: {
                // Closes the socket, and each connection once it has no request in progress.
                quiescing.initiateShutdown(promise: nil)
            }
            await connections.drained()
        } onCancel: {
            server.close(promise: nil)
            connections.abortAll()
        }
    }

    private func configure(_ channel: any Channel, connections: ConnectionSet) throws {
        let pipeline = channel.pipeline.syncOperations
        if let tls { try pipeline.addHandler(NIOSSLServerHandler(context: tls)) }
        try pipeline.configureHTTPServerPipeline(withPipeliningAssistance: true, withErrorHandling: true)
        try pipeline.addHandler(ReadAheadHandler(), position: .before(try pipeline.handler(type: HTTPServerPipelineHandler.self)))
        try pipeline.addHandler(ClientHangUpHandler())
        try pipeline.addHandler(
            ExchangeHandler(
                responder: responder,
                bodyLimit: bodyLimit,
                idleTimeout: idleTimeout,
                secure: tls != nil,
                connections: connections,
                logger: logger
            )
        )
    }
}

/// The listener's open connections, each with a way to stop it for good, and a wait for the last to go.
final class ConnectionSet: Sendable {
    private struct State {
        var open: [ObjectIdentifier: @Sendable () -> Void] = [:]
        var waiters: [CheckedContinuation<Void, Never>] = []
        /// Stopping for good: a connection that arrives now is stopped at once.
        var aborted = false
    }

    private let state = Mutex(State())

    /// `id` names the connection's channel (taken while it is open: a closed channel's context answers with a
    /// stand-in).
    func insert(_ id: ObjectIdentifier, abort: @escaping @Sendable () -> Void) {
        let aborted = state.withLock { state in
            state.open[id] = abort
            return state.aborted
        }
        if aborted { abort() }
    }

    func remove(_ id: ObjectIdentifier) {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.open[id] = nil
            guard state.open.isEmpty else { return [] }
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    func abortAll() {
        let all = state.withLock { state in
            state.aborted = true
            return Array(state.open.values)
        }
        for abort in all { abort() }
    }

    /// Returns once no connection is open.
    func drained() async {
        await withCheckedContinuation { continuation in
            let now = state.withLock { state in
                if state.open.isEmpty { return true }
                state.waiters.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }
}

/// The `Date` header's value (RFC 9110's IMF-fixdate), formatted once a second.
enum HTTPDate {
    static func now() -> String { stamp.now() }

    private static let stamp = SecondStamp(format: "%a, %d %b %Y %H:%M:%S GMT")
}
