import NIOCore

/// What the bridge knows of a request beyond its head: the socket peer, the connection, and the body as the
/// server read it.
public struct BridgeRequestContext: Sendable {
    public let remoteAddress: SocketAddress?
    /// The client's connection, so a long stream can notice that it has gone.
    let channel: any Channel
    /// The whole body, read by the server before the request is answered; empty when it was too large.
    let body: ByteBuffer
    /// The body passed the server's limit (`MAX_REQUEST_BYTES`), by its announced length or by the bytes read.
    let bodyTooLarge: Bool

    init(remoteAddress: SocketAddress?, channel: any Channel, body: ByteBuffer, bodyTooLarge: Bool) {
        self.remoteAddress = remoteAddress
        self.channel = channel
        self.body = body
        self.bodyTooLarge = bodyTooLarge
    }

    /// The peer's IP address without its port, `""` when unknown (a Unix socket, or a closed channel).
    var clientAddress: String { remoteAddress?.ipAddress ?? "" }
}
