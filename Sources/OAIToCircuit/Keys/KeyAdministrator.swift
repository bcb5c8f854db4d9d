import Foundation
import GRDB

/// Why a `keys` command could not do what it was asked.
public struct KeyAdminError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable {
        /// No key has that id or name.
        case notFound
        /// The request contradicts the registry (a name taken, a key already revoked).
        case conflict
        /// An argument is not acceptable (a name, an e-mail address, a prefix, rules).
        case invalid
        /// The policy cannot serve the key (a template it does not define).
        case configuration
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}

/// What `keys create`, `list`, `show`, `update`, `revoke`, `rotate` and `import` do, over the ledger's database.
/// Every change is one transaction with a history row, and rings the key-change bell once committed, so a running
/// bridge applies it on its next request. Secrets exist only in the results of `create` and `rotate`; the database
/// keeps their SHA-256.
public struct KeyAdministrator: Sendable {
    let ledger: SQLiteLedger
    let clock: BridgeClock
    let bell: KeyChangeBell?

    public init(ledger: SQLiteLedger, clock: BridgeClock = .system, bell: KeyChangeBell? = nil) {
        self.ledger = ledger
        self.clock = clock
        self.bell = bell
    }

    /// What to give a new key.
    public struct NewKey: Sendable {
        public var name: String
        public var email: String?
        public var description: String?
        public var prefix: String = KeyFormat.defaultPrefix
        public var template: String?
        public var rules: [(pattern: ModelPattern, rule: QuotaRule)] = []

        public init(name: String, email: String? = nil, description: String? = nil) {
            self.name = name
            self.email = email
            self.description = description
        }
    }

    /// A key and its secret, which is never available again.
    public struct Issued: Sendable {
        public var record: KeyRecord
        public var key: String
        /// When the secrets it replaces stop working (`rotate`).
        public var previousValidUntil: Double?
    }

    // MARK: Create

    /// `policy` checks the template (`nil`: no policy could be read, so a template cannot be checked and is refused).
    public func create(_ new: NewKey, policy: QuotaPolicy?) async throws -> Issued {
        let name = try Self.validName(new.name)
        let email = try new.email.map(Self.validEmail)
        if let problem = KeyFormat.validatePrefix(new.prefix) {
            throw KeyAdminError(.invalid, "--prefix \(problem)")
        }
        if let template = new.template { try Self.check(template: template, in: policy) }
        let now = clock.now()
        let secret = KeyFormat.newSecret()
        let rules = new.rules.isEmpty ? nil : QuotaPolicy.rulesJSON(new.rules)
        let description = new.description.flatMap(Self.nonEmpty)
        let record = try await change { db -> KeyRecord in
            if try KeyTables.isTaken(name, db) {
                throw KeyAdminError(.conflict, "a key named '\(name)' exists already (or a key has that id)")
            }
            var id = KeyFormat.newID()
            while try KeyTables.isTaken(id, db) { id = KeyFormat.newID() }
            let record = KeyRecord(
                id: id,
                name: name,
                email: email,
                description: description,
                template: new.template,
                rules: rules,
                prefix: new.prefix,
                createdAt: now
            )
            try KeyTables.insert(record, db)
            let key = KeyFormat.key(prefix: new.prefix, id: id, secret: secret)
            try KeyTables.insert(KeySecret(hash: KeyFormat.hash(key), keyID: id, createdAt: now), db)
            try KeyTables.note(id, "created", Self.describe(record), at: now, db)
            return record
        }
        return Issued(record: record, key: KeyFormat.key(prefix: new.prefix, id: record.id, secret: secret))
    }

    // MARK: Read

    /// A key with what `keys list` shows beside it.
    public struct Summary: Sendable {
        public var record: KeyRecord
        public var lastUsed: Double?
        public var usage: Tally
        /// When the latest secret a rotation replaced stops working, while it still works.
        public var previousValidUntil: Double?
    }

    public func list() async throws -> [Summary] {
        let now = clock.now()
        return try await ledger.inspect { db in
            let contents = try KeyTables.contents(db)
            let usage = try KeyTables.usage(of: contents.keys.map(\.id), db)
            let lastUsed = try KeyTables.lastUsed(db)
            return contents.keys.map { record in
                var total = Tally()
                for tally in (usage[record.id] ?? [:]).values { total.add(tally) }
                let grace = contents.secrets.filter { $0.keyID == record.id && $0.expiresAt != nil && $0.isValid(at: now) }
                return Summary(
                    record: record,
                    lastUsed: lastUsed[record.id],
                    usage: total,
                    previousValidUntil: grace.compactMap(\.expiresAt).max()
                )
            }
        }
    }

    /// Everything about one key, for `keys show`.
    public struct Details: Sendable {
        public var summary: Summary
        public var secrets: [KeySecret]
        public var usageByModel: [String: Tally]
        public var history: [KeyHistoryEntry]
    }

    public func show(_ idOrName: String) async throws -> Details {
        let now = clock.now()
        return try await ledger.inspect { db in
            guard let record = try KeyTables.find(idOrName, db) else { throw Self.notFound(idOrName) }
            let secrets = try KeyTables.secrets(of: record.id, db)
            let usage = try KeyTables.usage(of: [record.id], db)[record.id] ?? [:]
            var total = Tally()
            for tally in usage.values { total.add(tally) }
            let grace = secrets.filter { $0.expiresAt != nil && $0.isValid(at: now) }.compactMap(\.expiresAt).max()
            return Details(
                summary: Summary(
                    record: record,
                    lastUsed: try KeyTables.lastUsed(db)[record.id],
                    usage: total,
                    previousValidUntil: grace
                ),
                secrets: secrets,
                usageByModel: usage,
                history: try KeyTables.history(of: record.id, db)
            )
        }
    }

    // MARK: Change

    /// Fields `keys update` sets; `nil` leaves one as it is.
    public struct Changes: Sendable {
        public var name: String?
        /// `.some(nil)` removes it.
        public var email: String??
        public var description: String??
        public var template: String??
        public var rules: [(pattern: ModelPattern, rule: QuotaRule)]?

        public init() {}
    }

    public func update(_ idOrName: String, _ changes: Changes, policy: QuotaPolicy?) async throws -> KeyRecord {
        let name = try changes.name.map(Self.validName)
        let email = try changes.email.map { try $0.map(Self.validEmail) }
        if case .some(.some(let template)) = changes.template { try Self.check(template: template, in: policy) }
        let now = clock.now()
        return try await change { db -> KeyRecord in
            guard var record = try KeyTables.find(idOrName, db) else { throw Self.notFound(idOrName) }
            var changed: [String] = []
            if let name, name != record.name {
                if try Row.fetchOne(
                    db,
                    sql: "SELECT 1 FROM managed_key WHERE (name = ? OR id = ?) AND id != ?",
                    arguments: [name, name, record.id]
                ) != nil {
                    throw KeyAdminError(.conflict, "a key named '\(name)' exists already (or a key has that id)")
                }
                record.name = name
                changed.append("name")
            }
            if let email, email != record.email {
                record.email = email
                changed.append("email")
            }
            if let description = changes.description, description != record.description {
                record.description = description.flatMap(Self.nonEmpty)
                changed.append("description")
            }
            if let template = changes.template, template != record.template {
                record.template = template
                changed.append("template")
            }
            if let rules = changes.rules {
                let text = rules.isEmpty ? nil : QuotaPolicy.rulesJSON(rules)
                if text != record.rules {
                    record.rules = text
                    changed.append("rules")
                }
            }
            guard !changed.isEmpty else { return record }
            try db.execute(
                sql: "UPDATE managed_key SET name = ?, email = ?, description = ?, template = ?, rules = ? WHERE id = ?",
                arguments: [record.name, record.email, record.description, record.template, record.rules, record.id]
            )
            try KeyTables.note(record.id, "updated", changed.joined(separator: ", "), at: now, db)
            return record
        }
    }

    public func revoke(_ idOrName: String, reason: String) async throws -> KeyRecord {
        guard let reason = Self.nonEmpty(reason) else { throw KeyAdminError(.invalid, "--reason must not be empty") }
        let now = clock.now()
        return try await change { db -> KeyRecord in
            guard var record = try KeyTables.find(idOrName, db) else { throw Self.notFound(idOrName) }
            guard record.status == .active else {
                throw KeyAdminError(.conflict, "key \(record.id) (\(record.name)) is already \(record.status.rawValue)")
            }
            record.status = .revoked
            record.revokedAt = now
            record.revokeReason = reason
            try db.execute(
                sql: "UPDATE managed_key SET status = 'revoked', revoked_at = ?, revoke_reason = ? WHERE id = ?",
                arguments: [now, reason, record.id]
            )
            try KeyTables.note(record.id, "revoked", reason, at: now, db)
            return record
        }
    }

    /// A new secret for the same key (id, name, rules, counters and history stay). The secrets it replaces work for
    /// `grace` seconds more (0: they stop at once); a shorter grace also cuts one a previous rotation left running.
    public func rotate(_ idOrName: String, grace: Double, prefix: String? = nil) async throws -> Issued {
        guard grace >= 0, grace <= Self.longestGrace else {
            throw KeyAdminError(.invalid, "--grace must be between 0 and 10 years")
        }
        if let prefix, let problem = KeyFormat.validatePrefix(prefix) {
            throw KeyAdminError(.invalid, "--prefix \(problem)")
        }
        let now = clock.now()
        let secret = KeyFormat.newSecret()
        let until = now + grace
        let (record, key) = try await change { db -> (KeyRecord, String) in
            guard var record = try KeyTables.find(idOrName, db) else { throw Self.notFound(idOrName) }
            guard record.status == .active else {
                throw KeyAdminError(
                    .conflict,
                    "key \(record.id) (\(record.name)) is \(record.status.rawValue); create a new key instead"
                )
            }
            let prefix = prefix ?? record.prefix ?? KeyFormat.defaultPrefix
            let key = KeyFormat.key(prefix: prefix, id: record.id, secret: secret)
            try db.execute(
                sql: """
                    UPDATE managed_key_secret SET expires_at = ?
                    WHERE key_id = ? AND (expires_at IS NULL OR expires_at > ?)
                    """,
                arguments: [until, record.id, until]
            )
            try KeyTables.insert(KeySecret(hash: KeyFormat.hash(key), keyID: record.id, createdAt: now), db)
            try db.execute(
                sql: "UPDATE managed_key SET rotated_at = ?, prefix = ? WHERE id = ?",
                arguments: [now, prefix, record.id]
            )
            record.rotatedAt = now
            record.prefix = prefix
            let detail = grace == 0 ? "previous secret stopped at once" : "previous secret valid until \(KeyTime.text(until))"
            try KeyTables.note(record.id, "rotated", detail, at: now, db)
            return (record, key)
        }
        return Issued(record: record, key: key, previousValidUntil: grace == 0 ? nil : until)
    }

    // MARK: Helpers

    /// Ten years: longer is a mistake (and past what dates print as).
    static let longestGrace: Double = 10 * 366 * 86_400

    /// One immediate transaction (so concurrent commands queue instead of failing), then the bell.
    private func change<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws -> T {
        let result = try await ledger.administer(body)
        bell?.ring()
        return result
    }

    /// Never repeats an argument that may be a secret (one shaped like a key, or long): it would land in logs.
    static func notFound(_ idOrName: String) -> KeyAdminError {
        let mayBeSecret = KeyFormat.embeddedID(in: idOrName) != nil || idOrName.count > 40
        let named = mayBeSecret ? "that argument" : "the id or name '\(idOrName)'"
        return KeyAdminError(.notFound, "no key matches \(named) (see `oai-to-circuit keys list`)")
    }

    static func nonEmpty(_ text: String) -> String? {
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        return trimmed.isEmpty ? nil : trimmed
    }

    static func validName(_ name: String) throws -> String {
        guard let trimmed = nonEmpty(name) else { throw KeyAdminError(.invalid, "--name must not be empty") }
        guard trimmed.count <= 100 else { throw KeyAdminError(.invalid, "--name must be at most 100 characters") }
        guard !trimmed.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            throw KeyAdminError(.invalid, "--name must not hold control characters")
        }
        return trimmed
    }

    static func validEmail(_ email: String) throws -> String {
        let trimmed = email.trimmingCharacters(in: .whitespaces)
        let parts = trimmed.split(separator: "@", omittingEmptySubsequences: false)
        guard trimmed.count <= 254, parts.count == 2, !parts[0].isEmpty, parts[1].contains("."),
            !parts[1].hasPrefix("."), !parts[1].hasSuffix("."),
            !trimmed.unicodeScalars.contains(where: {
                $0.properties.isWhitespace || $0.properties.generalCategory == .control
            })
        else { throw KeyAdminError(.invalid, "--email '\(email)' is not an e-mail address") }
        return trimmed
    }

    static func check(template: String, in policy: QuotaPolicy?) throws {
        guard let policy else {
            throw KeyAdminError(
                .configuration,
                "cannot check template '\(template)': no quota policy found (set QUOTAS_JSON_PATH or use --env-file)"
            )
        }
        guard policy.templates[template] != nil else {
            let known = policy.templates.keys.sorted()
            throw KeyAdminError(
                .configuration,
                "template '\(template)' is not defined in the policy's _templates"
                    + (known.isEmpty ? " (it defines none)" : " (it defines: \(known.joined(separator: ", ")))")
            )
        }
    }

    static func describe(_ record: KeyRecord) -> String {
        var parts = ["name '\(record.name)'"]
        if let template = record.template { parts.append("template '\(template)'") }
        if record.rules != nil { parts.append("own rules") }
        return parts.joined(separator: ", ")
    }
}

/// Times as the `keys` commands print them: UTC to the second.
enum KeyTime {
    static func text(_ epochSeconds: Double) -> String {
        String(PeriodCalendar.timestamp(epochSeconds).prefix(19)) + "Z"
    }
}
