import Foundation
import GRDB

extension KeyAdministrator {
    /// What `keys import` did.
    public struct ImportReport: Sendable {
        public struct Entry: Sendable {
            /// Its position among the policy file's subkeys; `nil` for a key only the database named.
            public var ordinal: Int?
            /// The hashed id it had as a policy-file key.
            public var hashedID: String
            public var record: KeyRecord
            /// Whether this run imported it (`false`: the registry held it already).
            public var isNew: Bool
        }

        public var entries: [Entry] = []
        /// How many `_REVOKED_<subkey>` entries the file holds (the earlier bridge's markers, to remove as well).
        public var revokedMarkers = 0
        /// Ledger rows moved from the keys' plaintext or hashed names to their ids.
        public var movedRows = 0
        /// The WAL could not be emptied at once (the bridge was reading): older page images stay there until the
        /// next checkpoint.
        public var walKept = false

        public var imported: [Entry] { entries.filter(\.isNew) }
    }

    /// Turns the subkeys of `policy` (read from `source`) into managed keys: their secret stays what clients send, now
    /// stored only as a hash; their template and own rules, and their usage history (moved to the new ids), stay.
    /// Names, e-mail addresses and descriptions come from the earlier bridge's `subkey_names`, revoked or replaced
    /// states from its `key_lifecycle` and `_REVOKED_` markers; those rows are then deleted, so the database keeps no
    /// plaintext key. With `includeDatabaseNames`, keys only those tables name (the earlier bridge accepted them too)
    /// are imported as well, with no rules of their own. Keys already in the registry are left as they are, so running
    /// it twice changes nothing.
    public func importKeys(
        from policy: QuotaPolicy,
        source: String,
        includeDatabaseNames: Bool
    ) async throws -> ImportReport {
        let now = clock.now()
        let fileName = URL(fileURLWithPath: source).lastPathComponent
        let report = try await ledger.administer { db -> ImportReport in
            // Deleted rows are overwritten, not just unlinked: they held plaintext keys.
            try db.execute(sql: "PRAGMA secure_delete = ON")
            let earlier = try EarlierTables.read(db)
            struct Candidate {
                var subkey: String
                var ordinal: Int?
                var template: String?
                var rules: [(pattern: ModelPattern, rule: QuotaRule)]
            }
            var candidates = policy.orderedSubjects.map {
                Candidate(subkey: $0.subkey, ordinal: $0.ordinal, template: $0.template, rules: $0.ownRules)
            }
            if includeDatabaseNames {
                let inPolicy = Set(policy.subjects.keys)
                for subkey in earlier.subkeys where !inPolicy.contains(SubkeyDigest(subkey)) {
                    guard !subkey.isEmpty, !subkey.hasPrefix("_"), subkey != Caller.anonymousKey else { continue }
                    candidates.append(Candidate(subkey: subkey, ordinal: nil, template: nil, rules: []))
                }
            }
            var report = ImportReport()
            var imported = KeyRegistryContents()
            var plaintexts: [String] = []
            for candidate in candidates {
                let hash = KeyFormat.hash(candidate.subkey)
                let hashedID = SubkeyDigest.keyID(ofHash: hash)
                if let owner = try KeyTables.owner(ofHash: hash, db), let record = try KeyTables.find(owner, db) {
                    report.entries.append(
                        ImportReport.Entry(ordinal: candidate.ordinal, hashedID: hashedID, record: record, isNew: false)
                    )
                    continue
                }
                var id = KeyFormat.newID()
                while try KeyTables.isTaken(id, db) { id = KeyFormat.newID() }
                let names = earlier.names[candidate.subkey]
                let lifecycle = earlier.lifecycle[candidate.subkey]
                var record = KeyRecord(
                    id: id,
                    name: try Self.unusedName(names?.friendlyName ?? "imported-\(id)", db),
                    email: names?.email.flatMap { try? Self.validEmail($0) },
                    description: names?.description
                        ?? (candidate.ordinal.map { "imported from \(fileName) entry #\($0)" } ?? "imported from subkey_names"),
                    template: candidate.template,
                    rules: candidate.rules.isEmpty ? nil : QuotaPolicy.rulesJSON(candidate.rules),
                    origin: .imported,
                    createdAt: names?.createdAt ?? now
                )
                switch lifecycle?.status.lowercased() {
                case "replaced"?: record.status = .replaced
                case "active"?, nil: record.status = .active
                default: record.status = .revoked
                }
                let marker = policy.revokedMarkers[SubkeyDigest(candidate.subkey)]
                if record.status == .active, marker != nil { record.status = .revoked }
                if record.status != .active {
                    record.revokedAt =
                        lifecycle?.revokedAt ?? marker?.revokedAt.flatMap { EarlierTables.time($0.databaseValue) } ?? now
                    record.revokeReason = lifecycle?.reason ?? marker?.reason ?? "revoked in the earlier bridge"
                }
                try KeyTables.insert(record, db)
                let secret = KeySecret(hash: hash, keyID: id, createdAt: record.createdAt, imported: true)
                try KeyTables.insert(secret, db)
                let origin = candidate.ordinal.map { "from \(fileName) entry #\($0)" } ?? "from subkey_names"
                try KeyTables.note(id, "imported", "\(origin) (\(hashedID)), \(record.status.rawValue)", at: now, db)
                imported.keys.append(record)
                imported.secrets.append(secret)
                plaintexts.append(candidate.subkey)
                report.entries.append(
                    ImportReport.Entry(ordinal: candidate.ordinal, hashedID: hashedID, record: record, isNew: true)
                )
            }
            report.movedRows = try KeyTables.fold(imported, full: true, now: now, db)
            try EarlierTables.forget(plaintexts, db)
            report.revokedMarkers = policy.revokedMarkers.count
            return report
        }
        guard !report.imported.isEmpty else { return report }
        bell?.ring()
        // The request log's history, in small transactions beside the bridge's commits.
        var aliases: [String: String] = [:]
        for entry in report.imported { aliases[entry.hashedID] = entry.record.id }
        var position: Int64 = 0
        var result = report
        while let batch = try await ledger.administer({ [position, aliases] db in
            try KeyTables.foldRequestLog(aliases, after: position, limit: 20_000, db)
        }) {
            position = batch.last
            result.movedRows += batch.moved
        }
        // Copies the pages back into the database file and empties the WAL, which may hold older page images with the
        // plaintext keys. It cannot while another connection reads; the next checkpoint then overwrites them.
        do {
            try await ledger.truncateWAL()
        } catch {
            result.walKept = true
        }
        return result
    }

    /// `name`, or `name (2)`, `name (3)`… when another key has it.
    static func unusedName(_ name: String, _ db: Database) throws -> String {
        let base = (try? validName(name)) ?? "imported"
        var candidate = base
        var number = 2
        while try KeyTables.isTaken(candidate, db) {
            candidate = "\(base) (\(number))"
            number += 1
        }
        return candidate
    }
}

/// The earlier bridge's `subkey_names` and `key_lifecycle`, read with whatever columns a file has (they grew over
/// its versions), by plaintext subkey.
struct EarlierTables {
    struct Names {
        var friendlyName: String?
        var email: String?
        var description: String?
        var createdAt: Double?
    }

    struct Lifecycle {
        var status: String
        var revokedAt: Double?
        var reason: String?
    }

    var names: [String: Names] = [:]
    var lifecycle: [String: Lifecycle] = [:]

    /// Every subkey either table names, in a stable order.
    var subkeys: [String] { Set(names.keys).union(lifecycle.keys).sorted() }

    static func read(_ db: Database) throws -> EarlierTables {
        var tables = EarlierTables()
        if try db.tableExists("subkey_names") {
            let columns = Set(try db.columns(in: "subkey_names").map(\.name))
            let wanted = ["friendly_name", "email", "description", "created_at"].filter(columns.contains)
            let sql = "SELECT subkey\(wanted.map { ", \($0)" }.joined()) FROM subkey_names"
            for row in try Row.fetchAll(db, sql: sql) {
                guard let subkey: String = row["subkey"] else { continue }
                tables.names[subkey] = Names(
                    friendlyName: text(row, "friendly_name", columns),
                    email: text(row, "email", columns),
                    description: text(row, "description", columns),
                    createdAt: columns.contains("created_at") ? time(row["created_at"]) : nil
                )
            }
        }
        if try db.tableExists("key_lifecycle") {
            let columns = Set(try db.columns(in: "key_lifecycle").map(\.name))
            let wanted = ["revoked_at", "revoke_reason"].filter(columns.contains)
            let sql = "SELECT subkey, status\(wanted.map { ", \($0)" }.joined()) FROM key_lifecycle"
            for row in try Row.fetchAll(db, sql: sql) {
                guard let subkey: String = row["subkey"] else { continue }
                tables.lifecycle[subkey] = Lifecycle(
                    status: text(row, "status", ["status"]) ?? "active",
                    revokedAt: columns.contains("revoked_at") ? time(row["revoked_at"]) : nil,
                    reason: text(row, "revoke_reason", columns)
                )
            }
        }
        return tables
    }

    /// Deletes the rows that name `subkeys` (and the references other rows make to them): their content now lives in
    /// the registry, and they hold the keys in plaintext.
    static func forget(_ subkeys: [String], _ db: Database) throws {
        for table in ["subkey_names", "key_lifecycle", "monthly_usage"] where try db.tableExists(table) {
            for subkey in subkeys {
                try db.execute(sql: "DELETE FROM \(table) WHERE subkey = ?", arguments: [subkey])
            }
        }
        if try db.tableExists("key_lifecycle") {
            let columns = Set(try db.columns(in: "key_lifecycle").map(\.name))
            for column in ["replaced_by", "replaces"] where columns.contains(column) {
                for subkey in subkeys {
                    try db.execute(sql: "UPDATE key_lifecycle SET \(column) = NULL WHERE \(column) = ?", arguments: [subkey])
                }
            }
        }
    }

    private static func text(_ row: Row, _ column: String, _ columns: Set<String>) -> String? {
        guard columns.contains(column), let value: String = row[column] else { return nil }
        let trimmed = value.trimmingCharacters(in: .whitespacesAndNewlines)
        return trimmed.isEmpty ? nil : trimmed
    }

    /// The earlier bridge wrote times as ISO 8601 text (`datetime.isoformat()`) or SQLite's `CURRENT_TIMESTAMP`
    /// (`YYYY-MM-DD HH:MM:SS`, UTC).
    static func time(_ value: DatabaseValue) -> Double? {
        switch value.storage {
        case .double(let seconds): return seconds
        case .int64(let seconds): return Double(seconds)
        case .string(let text):
            let text = Array(text.trimmingCharacters(in: .whitespaces).utf8)
            guard text.count >= 19, let day = PeriodCalendar.day(parsing: String(decoding: text[0..<10], as: UTF8.self))
            else { return nil }
            func number(_ range: Range<Int>) -> Int? { Int(String(decoding: text[range], as: UTF8.self)) }
            guard let hours = number(11..<13), let minutes = number(14..<16), let seconds = number(17..<19) else {
                return nil
            }
            var time = Double(day) * 86_400 + Double(hours * 3_600 + minutes * 60 + seconds)
            // A fraction is dropped; an offset such as +00:00 or -05:00 is applied.
            if let sign = text[19...].firstIndex(where: { $0 == UInt8(ascii: "+") || $0 == UInt8(ascii: "-") }),
                text.count >= sign + 6, let offsetHours = number((sign + 1)..<(sign + 3)),
                let offsetMinutes = number((sign + 4)..<(sign + 6))
            {
                let offset = Double(offsetHours * 3_600 + offsetMinutes * 60)
                time += text[sign] == UInt8(ascii: "+") ? -offset : offset
            }
            return time
        default: return nil
        }
    }
}
