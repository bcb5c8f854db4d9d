import NIOCore

/// What the bridge knows of a request beyond its head: the socket peer, the connection, and the body as the
/// server reads it.
public struct BridgeRequestContext: Sendable {
    public let remoteAddress: SocketAddress?
    /// The client's connection, so a long stream can notice that it has gone.
    let channel: any Channel
    /// The body, still arriving when the responder starts (only a chat request's is read).
    let body: RequestBody

    init(remoteAddress: SocketAddress?, channel: any Channel, body: RequestBody) {
        self.remoteAddress = remoteAddress
        self.channel = channel
        self.body = body
    }

    /// The peer's IP address without its port, `""` when unknown (a Unix socket, or a closed channel).
    var clientAddress: String { remoteAddress?.ipAddress ?? "" }
}

/// A request's body as the server reads it. A chat request is handed to the responder from its head, so its subkey
/// is checked while the body arrives, and the body is awaited only after: a refused client's body is dropped once
/// its refusal is written, not read whole first.
enum RequestBody: Sendable {
    /// Not read: the route takes no body, or the request is refused from its head (a chat request without a
    /// subkey while one is required). Whatever the client sends is dropped.
    case none
    /// Whole once the request ends. Fails with 413 `request_too_large` once it passes `MAX_REQUEST_BYTES` (by its
    /// announced length or by the bytes read), with 400 `invalid_request` when the client stops sending halfway.
    case arriving(EventLoopFuture<ByteBuffer>)

    func collect() async throws -> ByteBuffer {
        switch self {
        case .none: ByteBuffer()
        case .arriving(let body): try await body.get()
        }
    }
}
