import Foundation
import GRDB

/// The keys registry's tables in the ledger's database, and the SQL over them. Secrets appear only as SHA-256
/// hashes; every change adds a `managed_key_history` row in the same transaction, so that table's largest id is the
/// registry's version.
enum KeyTables {
    static func create(_ db: Database) throws {
        try db.execute(
            sql: """
                CREATE TABLE managed_key (
                  id TEXT PRIMARY KEY NOT NULL,
                  name TEXT NOT NULL UNIQUE COLLATE NOCASE,
                  email TEXT, description TEXT, template TEXT, rules TEXT, prefix TEXT,
                  status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked', 'replaced')),
                  origin TEXT NOT NULL CHECK (origin IN ('created', 'imported')),
                  created_at REAL NOT NULL, rotated_at REAL, revoked_at REAL, revoke_reason TEXT);
                CREATE TABLE managed_key_secret (
                  hash BLOB PRIMARY KEY NOT NULL CHECK (length(hash) = 32),
                  key_id TEXT NOT NULL,
                  created_at REAL NOT NULL,
                  expires_at REAL,
                  imported INTEGER NOT NULL DEFAULT 0);
                CREATE INDEX managed_key_secret_key ON managed_key_secret (key_id);
                CREATE TABLE managed_key_history (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  key_id TEXT NOT NULL, at REAL NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
                CREATE INDEX managed_key_history_key ON managed_key_history (key_id, id);
                """
        )
    }

    static func version(_ db: Database) throws -> Int64 {
        guard try db.tableExists("managed_key_history") else { return 0 }
        return try Int64.fetchOne(db, sql: "SELECT coalesce(max(id), 0) FROM managed_key_history") ?? 0
    }

    /// The version is read first: a change committed meanwhile makes the next comparison reload again.
    static func contents(_ db: Database) throws -> KeyRegistryContents {
        guard try db.tableExists("managed_key") else { return KeyRegistryContents() }
        var contents = KeyRegistryContents(version: try version(db))
        contents.keys = try Row.fetchAll(db, sql: "SELECT * FROM managed_key ORDER BY created_at, id").map(record)
        contents.secrets = try Row.fetchAll(db, sql: "SELECT * FROM managed_key_secret ORDER BY created_at").map(secret)
        return contents
    }

    static func record(_ row: Row) -> KeyRecord {
        KeyRecord(
            id: row["id"],
            name: row["name"],
            email: row["email"],
            description: row["description"],
            template: row["template"],
            rules: row["rules"],
            prefix: row["prefix"],
            status: KeyStatus(rawValue: row["status"]) ?? .revoked,
            origin: KeyOrigin(rawValue: row["origin"]) ?? .created,
            createdAt: row["created_at"],
            rotatedAt: row["rotated_at"],
            revokedAt: row["revoked_at"],
            revokeReason: row["revoke_reason"]
        )
    }

    static func insert(_ key: KeyRecord, _ db: Database) throws {
        try db.execute(
            sql: """
                INSERT INTO managed_key (id, name, email, description, template, rules, prefix, status, origin,
                  created_at, rotated_at, revoked_at, revoke_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
            arguments: [
                key.id, key.name, key.email, key.description, key.template, key.rules, key.prefix, key.status.rawValue,
                key.origin.rawValue, key.createdAt, key.rotatedAt, key.revokedAt, key.revokeReason,
            ]
        )
    }

    static func insert(_ secret: KeySecret, _ db: Database) throws {
        try db.execute(
            sql: "INSERT INTO managed_key_secret (hash, key_id, created_at, expires_at, imported) VALUES (?, ?, ?, ?, ?)",
            arguments: [Data(secret.hash), secret.keyID, secret.createdAt, secret.expiresAt, secret.imported]
        )
    }

    static func note(_ keyID: String, _ action: String, _ detail: String, at time: Double, _ db: Database) throws {
        try db.execute(
            sql: "INSERT INTO managed_key_history (key_id, at, action, detail) VALUES (?, ?, ?, ?)",
            arguments: [keyID, time, action, detail]
        )
    }

    /// The key with this id, else the one with this name (case-insensitively), else the one this is a secret of (so
    /// a leaked key can be revoked by itself).
    static func find(_ idOrName: String, _ db: Database) throws -> KeyRecord? {
        guard try db.tableExists("managed_key") else { return nil }
        if let row = try Row.fetchOne(db, sql: "SELECT * FROM managed_key WHERE id = ?", arguments: [idOrName]) {
            return record(row)
        }
        if let row = try Row.fetchOne(db, sql: "SELECT * FROM managed_key WHERE name = ?", arguments: [idOrName]) {
            return record(row)
        }
        guard let owner = try owner(ofHash: KeyFormat.hash(idOrName), db) else { return nil }
        return try Row.fetchOne(db, sql: "SELECT * FROM managed_key WHERE id = ?", arguments: [owner]).map(record)
    }

    /// Whether `text` is a key's id or name (what a new name or id must not be).
    static func isTaken(_ text: String, _ db: Database) throws -> Bool {
        try Row.fetchOne(db, sql: "SELECT 1 FROM managed_key WHERE id = ? OR name = ?", arguments: [text, text]) != nil
    }

    /// Which key, if any, a secret with this hash belongs to.
    static func owner(ofHash hash: [UInt8], _ db: Database) throws -> String? {
        try String.fetchOne(db, sql: "SELECT key_id FROM managed_key_secret WHERE hash = ?", arguments: [Data(hash)])
    }

    static func secrets(of keyID: String, _ db: Database) throws -> [KeySecret] {
        try Row.fetchAll(
            db,
            sql: "SELECT * FROM managed_key_secret WHERE key_id = ? ORDER BY created_at",
            arguments: [keyID]
        ).map(secret)
    }

    static func secret(_ row: Row) -> KeySecret {
        let hash: Data = row["hash"]
        return KeySecret(
            hash: Array(hash),
            keyID: row["key_id"],
            createdAt: row["created_at"],
            expiresAt: row["expires_at"],
            imported: row["imported"]
        )
    }

    static func history(of keyID: String, _ db: Database) throws -> [KeyHistoryEntry] {
        try Row.fetchAll(
            db,
            sql: "SELECT at, action, detail FROM managed_key_history WHERE key_id = ? ORDER BY id",
            arguments: [keyID]
        ).map { KeyHistoryEntry(at: $0["at"], action: $0["action"], detail: $0["detail"]) }
    }

    /// Lifetime totals per model of the keys asked for (their `usage.subkey` is their id).
    static func usage(of keyIDs: [String], _ db: Database) throws -> [String: [String: Tally]] {
        guard !keyIDs.isEmpty, try db.tableExists("usage") else { return [:] }
        var totals: [String: [String: Tally]] = [:]
        let wanted = Set(keyIDs)
        for row in try Row.fetchAll(
            db,
            sql: "SELECT subkey, model, requests, prompt_tokens, completion_tokens, total_tokens FROM usage"
        ) {
            let key: String = row["subkey"]
            guard wanted.contains(key) else { continue }
            totals[key, default: [:]][row["model"]] = Tally(
                requests: SQLiteLedger.count(row, "requests"),
                promptTokens: SQLiteLedger.count(row, "prompt_tokens"),
                completionTokens: SQLiteLedger.count(row, "completion_tokens"),
                totalTokens: SQLiteLedger.count(row, "total_tokens")
            )
        }
        return totals
    }

    /// When each key was last used: the latest day with daily usage, then its latest request from that day on in the
    /// request log (kept `USAGE_LOG_RETENTION_DAYS`; older days give their start). The log is read once, from the
    /// earliest of those days, whatever the number of keys; nothing is written per request for this.
    static func lastUsed(_ db: Database) throws -> [String: Double] {
        guard try db.tableExists("usage_period") else { return [:] }
        var lastUsed: [String: Double] = [:]
        var earliest: Int?
        for row in try Row.fetchAll(
            db,
            sql: "SELECT key_id, max(period_start) AS day FROM usage_period WHERE period = 'daily' GROUP BY key_id"
        ) {
            guard let day = PeriodCalendar.day(parsing: row["day"]) else { continue }
            lastUsed[row["key_id"]] = Double(day) * 86_400
            earliest = min(earliest ?? day, day)
        }
        guard try db.tableExists("request_log"), let earliest,
            let start = try SQLiteLedger.firstLogID(readingFrom: Double(earliest) * 86_400, db)
        else { return lastUsed }
        for row in try Row.fetchAll(
            db,
            sql: "SELECT key_id, max(finished_at) AS last FROM request_log WHERE id >= ? GROUP BY key_id",
            arguments: [start]
        ) {
            // Only for keys whose last day of use is known, and not before it.
            let keyID: String = row["key_id"]
            if let last: Double = row["last"], let dayStart = lastUsed[keyID], last >= dayStart { lastUsed[keyID] = last }
        }
        return lastUsed
    }

    /// Moves ledger rows of imported keys from their old names to their ids: `usage` rows under the plaintext subkey
    /// (deleted with SQLite's secure delete, as they hold it), and `usage_period` rows under the hashed id. `full`
    /// moves every period (`keys import`); otherwise only the current day and month, which is all a request in flight
    /// during an import can have written (the bridge, at start and after a reload). Each table is read once,
    /// whatever the number of keys. The request log is `foldRequestLog`'s, in batches.
    static func fold(_ contents: KeyRegistryContents, full: Bool, now: Double, _ db: Database) throws -> Int {
        let aliases = contents.importedAliases
        guard !aliases.isEmpty, try db.tableExists("usage") else { return 0 }
        var owners: [SubkeyDigest: String] = [:]
        for secret in contents.secrets where secret.imported {
            if let digest = SubkeyDigest(hash: secret.hash) { owners[digest] = secret.keyID }
        }
        let managed = Set(contents.keys.map(\.id))
        var moved = 0
        let wasSecure = try Bool.fetchOne(db, sql: "PRAGMA secure_delete") ?? false
        try db.execute(sql: "PRAGMA secure_delete = ON")
        defer { if !wasSecure { try? db.execute(sql: "PRAGMA secure_delete = OFF") } }
        for subkey in try String.fetchAll(db, sql: "SELECT DISTINCT subkey FROM usage") {
            guard !managed.contains(subkey), subkey != Caller.anonymousKey,
                let keyID = owners[SubkeyDigest(subkey)]
            else { continue }
            try db.execute(
                sql: """
                    INSERT INTO usage (subkey, model, requests, prompt_tokens, completion_tokens, total_tokens)
                    SELECT ?, model, requests, prompt_tokens, completion_tokens, total_tokens FROM usage WHERE subkey = ?
                    ON CONFLICT (subkey, model) DO UPDATE SET \(SQLiteLedger.addition)
                    """,
                arguments: [keyID, subkey]
            )
            try db.execute(sql: "DELETE FROM usage WHERE subkey = ?", arguments: [subkey])
            moved += db.changesCount
        }
        guard try db.tableExists("usage_period") else { return moved }
        try fillAliases(aliases, db)
        var scope = ""
        var arguments: StatementArguments = []
        if !full {
            let today = PeriodCalendar.day(now)
            scope = "AND ((period = 'daily' AND period_start = ?) OR (period = 'monthly' AND period_start = ?))"
            arguments = [PeriodCalendar.dayString(today), PeriodCalendar.monthString(PeriodCalendar.month(ofDay: today))]
        }
        try db.execute(
            sql: """
                INSERT INTO usage_period (key_id, model, period, period_start, requests, prompt_tokens,
                  completion_tokens, total_tokens)
                SELECT alias.key_id, model, period, period_start, requests, prompt_tokens, completion_tokens, total_tokens
                FROM usage_period JOIN temp.key_alias AS alias ON alias.alias = usage_period.key_id WHERE 1 \(scope)
                ON CONFLICT (period, period_start, key_id, model) DO UPDATE SET \(SQLiteLedger.addition)
                """,
            arguments: arguments
        )
        try db.execute(
            sql: "DELETE FROM usage_period WHERE key_id IN (SELECT alias FROM temp.key_alias) \(scope)",
            arguments: arguments
        )
        moved += db.changesCount
        return moved
    }

    /// Request-log rows with ids in `(after, after + limit]`... moved from the imported keys' hashed ids to their ids.
    /// Returns the last id looked at, or `nil` past the end. Small batches, so the bridge's writer never waits long.
    static func foldRequestLog(
        _ aliases: [String: String],
        after id: Int64,
        limit: Int,
        _ db: Database
    ) throws -> (
        last: Int64, moved: Int
    )? {
        guard !aliases.isEmpty, try db.tableExists("request_log"),
            let last = try Int64.fetchOne(
                db,
                sql: "SELECT max(id) FROM (SELECT id FROM request_log WHERE id > ? ORDER BY id LIMIT ?)",
                arguments: [id, limit]
            )
        else { return nil }
        try fillAliases(aliases, db)
        try db.execute(
            sql: """
                UPDATE request_log SET key_id = (SELECT key_id FROM temp.key_alias WHERE alias = request_log.key_id)
                WHERE id > ? AND id <= ? AND key_id IN (SELECT alias FROM temp.key_alias)
                """,
            arguments: [id, last]
        )
        return (last, db.changesCount)
    }

    private static func fillAliases(_ aliases: [String: String], _ db: Database) throws {
        try db.execute(sql: "CREATE TEMP TABLE IF NOT EXISTS key_alias (alias TEXT PRIMARY KEY, key_id TEXT NOT NULL)")
        try db.execute(sql: "DELETE FROM temp.key_alias")
        let insert = try db.cachedStatement(sql: "INSERT INTO temp.key_alias (alias, key_id) VALUES (?, ?)")
        for (alias, keyID) in aliases { try insert.execute(arguments: [alias, keyID]) }
    }
}

extension SQLiteLedger: KeyRegistrySource {
    public func keyRegistryVersion() async throws -> Int64 {
        try await (outboxReader ?? database).read { db in try KeyTables.version(db) }
    }

    public func keyRegistry() async throws -> KeyRegistryContents {
        try await (outboxReader ?? database).read { db in
            // Another process (a `keys` command) may have made the tables since this connection last looked.
            db.clearSchemaCache()
            return try KeyTables.contents(db)
        }
    }

    public func foldImportedKeys(_ contents: KeyRegistryContents, now: Double) async throws -> Int {
        try await database.write { db in try KeyTables.fold(contents, full: false, now: now, db) }
    }

    /// Runs `body` in one immediate write transaction (the `keys` commands): it takes the write lock at once, so a
    /// concurrent command or the bridge's writer waits for it (up to the busy timeout) instead of failing halfway.
    func administer<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws -> T {
        try await database.writeWithoutTransaction { db in
            var result: T?
            try db.inTransaction(.immediate) {
                result = try body(db)
                return .commit
            }
            guard let result else { throw DatabaseError(resultCode: .SQLITE_ABORT, message: "transaction rolled back") }
            return result
        }
    }

    /// Copies the WAL into the database file and empties it, when no other connection is reading.
    func truncateWAL() async throws {
        try await database.writeWithoutTransaction { db in _ = try db.checkpoint(.truncate) }
    }

    /// Runs `body` in one read transaction (the `keys` commands).
    func inspect<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws -> T {
        try await database.read { db in
            db.clearSchemaCache()
            return try body(db)
        }
    }
}
