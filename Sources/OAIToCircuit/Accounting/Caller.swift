import Crypto

/// Who a request comes from: a subkey, or nobody (only when `REQUIRE_SUBKEY=false`).
/// Its description is the non-secret key id, so a `Caller` can be logged; the subkey itself never is.
public struct Caller: Sendable, Equatable, CustomStringConvertible {
    /// The secret the client presented; `nil` for anonymous requests. Never logged, never sent upstream.
    public let subkey: String?
    /// Non-secret identity: a managed key's id, `sha256:<16 hex>` for a policy-file key, or `anonymous`.
    public var keyID: String
    public var friendlyName: String?
    public var email: String?

    public init(subkey: String?, keyID: String? = nil, friendlyName: String? = nil, email: String? = nil) {
        self.subkey = subkey
        self.keyID = keyID ?? subkey.map(Self.hash) ?? "anonymous"
        self.friendlyName = friendlyName
        self.email = email
    }

    public static let anonymous = Caller(subkey: nil)

    public var isAnonymous: Bool { subkey == nil }

    /// `sha256:` and the first 16 hex digits of the subkey's SHA-256, as Splunk events carry it.
    public static func hash(_ subkey: String) -> String {
        let digest = SHA256.hash(data: Array(subkey.utf8))
        let hex = "0123456789abcdef".utf8.map { $0 }
        var text = "sha256:"
        for byte in digest.prefix(8) {
            text.unicodeScalars.append(Unicode.Scalar(hex[Int(byte >> 4)]))
            text.unicodeScalars.append(Unicode.Scalar(hex[Int(byte & 0xF)]))
        }
        return text
    }

    public var description: String { keyID }
}
