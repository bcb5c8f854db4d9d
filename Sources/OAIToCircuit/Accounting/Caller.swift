/// Who a request comes from: a subkey, or nobody (only when `REQUIRE_SUBKEY=false`).
/// Its description is the non-secret key id, so a `Caller` can be logged; the subkey itself never is.
public struct Caller: Sendable, Equatable, CustomStringConvertible {
    /// The secret the client presented; `nil` for anonymous requests. Never logged, never sent upstream.
    public let subkey: String?
    /// SHA-256 of the subkey, computed once per request: how the policy finds the caller's rules.
    public let digest: SubkeyDigest?
    /// Non-secret identity: a managed key's id, `sha256:<16 hex>` for a policy-file key, or `anonymous`.
    public var keyID: String
    /// The `usage` table's `subkey` for this caller (contract 5.3): a policy-file key's own value, as the earlier
    /// bridge wrote it; a managed key's id; or `anonymous`.
    public var ledgerKey: String
    public var friendlyName: String?
    public var email: String?

    /// `digest`: the subkey's, when the caller of this has it already (it is computed otherwise).
    public init(
        subkey: String?,
        digest: SubkeyDigest? = nil,
        keyID: String? = nil,
        ledgerKey: String? = nil,
        friendlyName: String? = nil,
        email: String? = nil
    ) {
        self.subkey = subkey
        let digest = digest ?? subkey.map(SubkeyDigest.init)
        self.digest = digest
        let subkeyHash = digest?.keyID ?? Self.anonymousKey
        self.subkeyHash = subkeyHash
        self.keyID = keyID ?? subkeyHash
        self.ledgerKey = ledgerKey ?? subkey ?? Self.anonymousKey
        self.friendlyName = friendlyName
        self.email = email
    }

    /// How anonymous requests appear in the ledger and in events.
    public static let anonymousKey = "anonymous"

    public static let anonymous = Caller(subkey: nil)

    public var isAnonymous: Bool { subkey == nil }

    /// `sha256:` and the first 16 hex digits of the subkey's SHA-256, as Splunk events carry it.
    public static func hash(_ subkey: String) -> String { SubkeyDigest(subkey).keyID }

    /// The hashed subkey of Splunk's `subkey` field: `anonymous` without one.
    public let subkeyHash: String

    public var description: String { keyID }

    public static func == (lhs: Caller, rhs: Caller) -> Bool {
        lhs.subkey == rhs.subkey && lhs.keyID == rhs.keyID && lhs.ledgerKey == rhs.ledgerKey
            && lhs.friendlyName == rhs.friendlyName && lhs.email == rhs.email
    }
}
