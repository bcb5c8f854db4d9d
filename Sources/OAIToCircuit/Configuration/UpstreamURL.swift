import Foundation

/// An absolute http(s) URL of an upstream service, without query or fragment, kept without a trailing slash
/// so paths can be appended.
public struct UpstreamURL: Sendable, Equatable, CustomStringConvertible {
    public let string: String

    public init?(validating text: String) {
        guard let components = URLComponents(string: text),
            let scheme = components.scheme?.lowercased(), scheme == "http" || scheme == "https",
            let host = components.host, !host.isEmpty,
            components.query == nil, components.fragment == nil, components.user == nil
        else { return nil }
        var string = text
        while string.hasSuffix("/") { string.removeLast() }
        self.string = string
    }

    /// This URL with `path` (starting with `/`) appended.
    public func appending(path: String) -> String { string + path }

    public var description: String { string }
}
