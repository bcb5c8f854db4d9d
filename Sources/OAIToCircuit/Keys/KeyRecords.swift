/// A managed key's state. `replaced` comes only from the earlier bridge's `key_lifecycle` (by `keys import`).
public enum KeyStatus: String, Sendable, CaseIterable {
    case active
    case revoked
    case replaced
}

/// How a key came into the registry.
public enum KeyOrigin: String, Sendable {
    /// Made by `keys create`: its secret was generated here and shown once.
    case created
    /// Taken over from a policy file by `keys import`: its secret is the subkey clients already use.
    case imported
}

/// One key of the registry, never with its secret.
public struct KeyRecord: Sendable, Equatable {
    /// The non-secret id: what logs, reports, the ledger (`usage.subkey`) and Splunk (`key_id`) call the key.
    public var id: String
    /// Unique, case-insensitively; Splunk's `friendly_name`.
    public var name: String
    public var email: String?
    public var description: String?
    /// A template of the policy file's `_templates`.
    public var template: String?
    /// Its own rules as JSON in the policy file's form; `nil` for none.
    public var rules: String?
    /// What `keys rotate` starts the new key with (`nil` for imported keys: the default prefix).
    public var prefix: String?
    public var status: KeyStatus
    public var origin: KeyOrigin
    public var createdAt: Double
    public var rotatedAt: Double?
    public var revokedAt: Double?
    public var revokeReason: String?

    public init(
        id: String,
        name: String,
        email: String? = nil,
        description: String? = nil,
        template: String? = nil,
        rules: String? = nil,
        prefix: String? = nil,
        status: KeyStatus = .active,
        origin: KeyOrigin = .created,
        createdAt: Double,
        rotatedAt: Double? = nil,
        revokedAt: Double? = nil,
        revokeReason: String? = nil
    ) {
        self.id = id
        self.name = name
        self.email = email
        self.description = description
        self.template = template
        self.rules = rules
        self.prefix = prefix
        self.status = status
        self.origin = origin
        self.createdAt = createdAt
        self.rotatedAt = rotatedAt
        self.revokedAt = revokedAt
        self.revokeReason = revokeReason
    }
}

extension KeyRecord {
    /// Its own rules, parsed.
    func parsedRules() throws(PolicyError) -> [(pattern: ModelPattern, rule: QuotaRule)] {
        guard let rules else { return [] }
        return try QuotaPolicy.parseRules(Array(rules.utf8), source: "key \(id) rules")
    }

    /// The rules the bridge enforces as the key's own: rules that do not parse (only a hand-edited database has
    /// them) refuse every model, which is safer than no limits.
    var enforcedRules: [(pattern: ModelPattern, rule: QuotaRule)] {
        (try? parsedRules()) ?? [(ModelPattern.anyModel, QuotaRule(requests: .limit(0)))]
    }
}

/// The SHA-256 of one secret of a key. A key has one current secret and, after `keys rotate --grace`, older ones
/// that work until they expire. Expired hashes are kept, so a retired secret is always refused, even if a policy
/// file still names it.
public struct KeySecret: Sendable, Equatable {
    public var hash: [UInt8]
    public var keyID: String
    public var createdAt: Double
    /// When it stops working; `nil` while it is the current secret.
    public var expiresAt: Double?
    /// Taken over from a policy file by `keys import`: ledger rows may still name it by its hashed id.
    public var imported: Bool

    public init(hash: [UInt8], keyID: String, createdAt: Double, expiresAt: Double? = nil, imported: Bool = false) {
        self.hash = hash
        self.keyID = keyID
        self.createdAt = createdAt
        self.expiresAt = expiresAt
        self.imported = imported
    }

    public func isValid(at time: Double) -> Bool { expiresAt.map { time < $0 } ?? true }
}

/// The whole registry as read at one moment, with its version (it grows with every change).
public struct KeyRegistryContents: Sendable {
    public var version: Int64
    public var keys: [KeyRecord]
    public var secrets: [KeySecret]

    public init(version: Int64 = 0, keys: [KeyRecord] = [], secrets: [KeySecret] = []) {
        self.version = version
        self.keys = keys
        self.secrets = secrets
    }

    /// The hashed ids (`sha256:<16 hex>`) imported keys had as policy-file keys, and the ids they have now.
    public var importedAliases: [String: String] {
        var aliases: [String: String] = [:]
        for secret in secrets where secret.imported { aliases[SubkeyDigest.keyID(ofHash: secret.hash)] = secret.keyID }
        return aliases
    }
}

/// One line of a key's history.
public struct KeyHistoryEntry: Sendable, Equatable {
    public var at: Double
    /// `created`, `imported`, `rotated`, `revoked`.
    public var action: String
    public var detail: String
}

/// Where the bridge reads the registry from (the ledger's database).
public protocol KeyRegistrySource: Sendable {
    /// Grows with every change to the registry; cheap to read.
    func keyRegistryVersion() async throws -> Int64
    func keyRegistry() async throws -> KeyRegistryContents
    /// Moves what imported keys left under their old names (a plaintext `usage.subkey`, a hashed `key_id`) to their
    /// ids: requests that were in flight while `keys import` ran may have been written under the old names. Returns
    /// the rows moved.
    func foldImportedKeys(_ contents: KeyRegistryContents, now: Double) async throws -> Int
}

extension SubkeyDigest {
    /// The hashed id of the subkey whose SHA-256 is `hash`.
    static func keyID<Hash: Sequence<UInt8>>(ofHash hash: Hash) -> String {
        let hex = Array("0123456789abcdef".utf8)
        var text = "sha256:"
        for byte in hash.prefix(8) {
            text.unicodeScalars.append(Unicode.Scalar(hex[Int(byte >> 4)]))
            text.unicodeScalars.append(Unicode.Scalar(hex[Int(byte & 0xF)]))
        }
        return text
    }
}
