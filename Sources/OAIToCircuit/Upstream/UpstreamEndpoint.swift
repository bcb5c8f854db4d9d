import Foundation

/// Where chat requests go, read once from `CIRCUIT_BASE`: scheme, host, port, the path the deployments hang from,
/// and the `Host` header.
struct UpstreamEndpoint: Sendable, Equatable {
    var usesTLS: Bool
    /// A name or an IP address (without brackets).
    var host: String
    var port: Int
    /// `CIRCUIT_BASE`'s path without a trailing slash; empty for the host's root.
    var path: String
    var hostHeader: String

    init(_ url: UpstreamURL) {
        // UpstreamURL has validated scheme and host already.
        let components = URLComponents(string: url.string)
        let usesTLS = components?.scheme?.lowercased() == "https"
        var host = components?.host ?? "localhost"
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        let defaultPort = usesTLS ? 443 : 80
        let port = components?.port ?? defaultPort
        self.usesTLS = usesTLS
        self.host = host
        self.port = port
        self.path = components?.percentEncodedPath ?? ""
        while path.hasSuffix("/") { path.removeLast() }
        let literal = host.contains(":") ? "[\(host)]" : host
        self.hostHeader = port == defaultPort ? literal : "\(literal):\(port)"
    }

    /// Whether `host` is an IP address, which TLS's server name indication must not carry.
    var hostIsAddress: Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }
}
