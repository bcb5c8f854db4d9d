import Hummingbird
import Logging
import NIOCore

/// What the bridge knows of a request beyond its head and body: the socket peer and the request's logger.
public struct BridgeRequestContext: InitializableFromSource {
    public let remoteAddress: SocketAddress?
    public let logger: Logger
    /// The client's connection, so a long stream can notice that it has gone.
    let channel: any Channel

    public init(source: ApplicationRequestContextSource) {
        self.remoteAddress = source.channel.remoteAddress
        self.logger = source.logger
        self.channel = source.channel
    }

    /// The peer's IP address without its port, `""` when unknown (a Unix socket, or a closed channel).
    var clientAddress: String { remoteAddress?.ipAddress ?? "" }
}
