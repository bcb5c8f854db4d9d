import ArgumentParser
import Foundation

#if canImport(Glibc)
import Glibc
#endif

struct KeysCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keys",
        abstract: "Create, list, rotate, revoke and import subkeys (the keys registry).",
        discussion: """
            Keys live in the usage database (--db, else QUOTA_DB_PATH, else quota.db) as SHA-256 hashes only; a new \
            key's secret is printed once. A running bridge applies every change from its next request. Run these \
            as the service's user (sudo -u oai-bridge …) so the files they create stay the service's.
            """,
        subcommands: [Create.self, List.self, Show.self, Update.self, Revoke.self, Rotate.self, Import.self]
    )

    /// `--db` and `--env-file`, and what every subcommand opens with them.
    struct DatabaseOptions: ParsableArguments {
        @Option(help: "Usage database (default: QUOTA_DB_PATH, else quota.db).") var db: String?
        @OptionGroup var options: EnvironmentOptions

        func environment() throws -> [String: String] { try options.environment() }

        func path(_ environment: [String: String]) -> String { db ?? environment["QUOTA_DB_PATH"] ?? "quota.db" }

        /// The ledger and an administrator over it. `mustExist` refuses to make a new database; `changes` maps the
        /// key-change bell, to ring once a change is committed.
        func open(mustExist: Bool, changes: Bool) throws -> (KeyAdministrator, SQLiteLedger, String, [String: String]) {
            let environment = try environment()
            let path = path(environment)
            let exists = FileManager.default.fileExists(atPath: path)
            if mustExist, !exists {
                printError(
                    "error: no database at \(path) (QUOTA_DB_PATH, or --db): start the bridge once"
                        + (changes ? ", or pass --create-db if the bridge will use this path" : "")
                )
                throw ExitCode.failure
            }
            if !exists { printError("note: creating a new usage database at \(path)") }
            let ledger: SQLiteLedger
            do {
                // Reading commands change nothing, not even an earlier bridge's file that was never migrated.
                ledger = try SQLiteLedger.open(path: path, readOnly: !changes)
            } catch {
                printError("error: cannot open \(path): \(LedgerWriter.describe(error))")
                throw ExitCode.failure
            }
            let bell = changes ? KeyChangeBell(databasePath: path, create: true) : nil
            if changes, bell == nil {
                printError(
                    "note: cannot write \(KeyChangeBell.path(forDatabase: path)); a running bridge applies this change within seconds"
                )
            }
            return (KeyAdministrator(ledger: ledger, bell: bell), ledger, path, environment)
        }
    }

    /// Runs `body` against the registry, turning its errors into messages and exit codes, and closes the database.
    static func run<T>(
        _ options: DatabaseOptions,
        mustExist: Bool,
        changes: Bool = true,
        _ body: (KeyAdministrator, [String: String]) async throws -> T
    ) async throws -> T {
        let (administrator, ledger, path, environment) = try options.open(mustExist: mustExist, changes: changes)
        defer { if changes { FileOwnership.matchDirectory(of: path) } }
        do {
            let result = try await body(administrator, environment)
            try? await ledger.close()
            return result
        } catch let error as KeyAdminError {
            try? await ledger.close()
            printError("error: \(error.message)")
            switch error.kind {
            case .configuration: throw configurationExitCode
            case .invalid: throw ExitCode.validationFailure
            case .notFound, .conflict: throw ExitCode.failure
            }
        } catch let exit as ExitCode {
            try? await ledger.close()
            throw exit
        } catch {
            try? await ledger.close()
            printError("error: \(path): \(LedgerWriter.describe(error))")
            throw ExitCode.failure
        }
    }

    /// The policy the bridge would load (QUOTAS_JSON, else QUOTAS_JSON_PATH, else quotas.json), or `nil` when there
    /// is none; an invalid one is an error.
    static func policy(_ environment: [String: String]) throws -> QuotaPolicy? {
        let source: PolicySource =
            environment["QUOTAS_JSON"].map { .inline($0) } ?? .file(environment["QUOTAS_JSON_PATH"] ?? "quotas.json")
        guard source.exists else { return nil }
        do {
            return try source.load()
        } catch {
            throw configurationFailure(error.message)
        }
    }

    static func rules(_ json: String) throws -> [(pattern: ModelPattern, rule: QuotaRule)] {
        do {
            return try QuotaPolicy.parseRules(Array(json.utf8), source: "--rules")
        } catch {
            throw KeyAdminError(.invalid, error.message)
        }
    }

    // MARK: create

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a key and print it (the only time it is shown).",
            discussion: """
                Rules apply in layers: the policy's _global rules, then the template's, then --rules (a JSON object \
                of model patterns, as a subkey's entry in quotas.json: '{"gpt-4o": {"requests": 100, "period": "daily"}}').
                """
        )

        @Option(help: "Who the key is for; unique (Splunk's friendly_name).") var name: String
        @Option(help: "Their e-mail address.") var email: String?
        @Option(help: "A note for operators.") var description: String?
        @Option(help: "What the key starts with (letters, digits, - and _).") var prefix = KeyFormat.defaultPrefix
        @Option(help: "A template of the policy's _templates.") var template: String?
        @Option(help: "The key's own rules, as JSON.") var rules: String?
        @Flag(help: "Print JSON.") var json = false
        @Flag(name: .customLong("create-db"), help: "Make the database if it does not exist yet.") var createDatabase = false
        @OptionGroup var database: DatabaseOptions

        func run() async throws {
            let issued = try await KeysCommand.run(database, mustExist: !createDatabase) { administrator, environment in
                var new = KeyAdministrator.NewKey(name: name, email: email, description: description)
                new.prefix = prefix
                new.template = template
                if let rules { new.rules = try KeysCommand.rules(rules) }
                return try await administrator.create(new, policy: template == nil ? nil : try KeysCommand.policy(environment))
            }
            // The key's only appearance, on standard output for the operator who asked for it; never logged.
            if json {
                var writer = KeysCommand.json(issued.record)
                writer.string("key", issued.key)
                print(String(decoding: writer.finish(), as: UTF8.self))
                return
            }
            let record = issued.record
            print("Created key \(record.id) for \(KeysCommand.who(record)).\n\n  \(issued.key)\n")
            print("This is the only time the key is shown: the database keeps only its hash. Hand it over privately;")
            print("clients send it as 'Authorization: Bearer <key>' (or the X-Bridge-Subkey header).")
        }
    }

    // MARK: list

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List keys, with their use (never a secret).")

        @Flag(help: "Print JSON.") var json = false
        @OptionGroup var database: DatabaseOptions

        func run() async throws {
            let keys = try await KeysCommand.run(database, mustExist: true, changes: false) { administrator, _ in
                try await administrator.list()
            }
            if json {
                let objects = keys.map { key in
                    var writer = KeysCommand.json(key)
                    return String(decoding: writer.finish(), as: UTF8.self)
                }
                print(objects.isEmpty ? "[]" : "[\n  " + objects.joined(separator: ",\n  ") + "\n]")
                return
            }
            guard !keys.isEmpty else {
                print("No keys yet: make one with `oai-to-circuit keys create --name NAME`.")
                return
            }
            var rows = [["id", "name", "email", "status", "template", "created", "last used", "requests", "total_tokens"]]
            for key in keys {
                let record = key.record
                rows.append([
                    record.id, record.name, record.email ?? "-", KeysCommand.status(key), record.template ?? "-",
                    String(KeyTime.text(record.createdAt).prefix(10)), key.lastUsed.map(KeyTime.text) ?? "never",
                    String(key.usage.requests), String(key.usage.totalTokens),
                ])
            }
            print(TextTable.render(rows, rightAligned: [7, 8]), terminator: "")
        }
    }

    // MARK: show

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Everything about one key: rules, secrets, use, history.")

        @Argument(help: "The key's id or name.") var key: String
        @Flag(help: "Print JSON.") var json = false
        @OptionGroup var database: DatabaseOptions

        func run() async throws {
            let (details, policy) = try await KeysCommand.run(database, mustExist: true, changes: false) {
                administrator,
                environment in
                (try await administrator.show(key), try? KeysCommand.policy(environment))
            }
            if json {
                var writer = KeysCommand.json(details.summary)
                writer.string("description", details.summary.record.description)
                writer.number("rules", exact: details.summary.record.rules ?? "null")
                writer.open("usage_by_model")
                for (model, tally) in details.usageByModel.sorted(by: { $0.key < $1.key }) {
                    writer.open(model)
                    KeysCommand.tally(tally, into: &writer)
                    writer.close()
                }
                writer.close()
                print(String(decoding: writer.finish(), as: UTF8.self))
                return
            }
            print(KeysCommand.describe(details, policy: policy ?? nil), terminator: "")
        }
    }

    // MARK: update

    struct Update: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change a key's name, e-mail, description, template or rules (its secret stays)."
        )

        @Argument(help: "The key's id or name.") var key: String
        @Option(help: "A new name.") var name: String?
        @Option(help: "A new e-mail address (empty removes it).") var email: String?
        @Option(help: "A new description (empty removes it).") var description: String?
        @Option(help: "A new template (empty removes it).") var template: String?
        @Option(help: "New own rules, as JSON ('{}' removes them).") var rules: String?
        @OptionGroup var database: DatabaseOptions

        func run() async throws {
            let record = try await KeysCommand.run(database, mustExist: true) { administrator, environment in
                var changes = KeyAdministrator.Changes()
                changes.name = name
                changes.email = email.map { $0.isEmpty ? nil : $0 }
                changes.description = description.map { $0.isEmpty ? nil : $0 }
                changes.template = template.map { $0.isEmpty ? nil : $0 }
                if let rules { changes.rules = try KeysCommand.rules(rules) }
                let needsPolicy = template.map { !$0.isEmpty } ?? false
                return try await administrator.update(
                    key,
                    changes,
                    policy: needsPolicy ? try KeysCommand.policy(environment) : nil
                )
            }
            print("Key \(record.id) (\(KeysCommand.who(record))) is up to date. A running bridge uses it from its next request.")
        }
    }

    // MARK: revoke

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Refuse a key from now on (403); its history and usage stay."
        )

        @Argument(help: "The key's id or name.") var key: String
        @Option(help: "Why (kept in its history).") var reason: String
        @OptionGroup var database: DatabaseOptions

        func run() async throws {
            let record = try await KeysCommand.run(database, mustExist: true) { administrator, _ in
                try await administrator.revoke(key, reason: reason)
            }
            print("Revoked key \(record.id) (\(KeysCommand.who(record))). A running bridge refuses it from its next request.")
        }
    }

    // MARK: rotate

    struct Rotate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Give a key a new secret; its id, name, rules, counters and history stay.",
            discussion: "The previous secret keeps working for --grace (e.g. 30m, 24h, 7d, 1h30m; default 0: it stops at once)."
        )

        @Argument(help: "The key's id or name.") var key: String
        @Option(help: "How long the previous secret keeps working.") var grace = "0"
        @Option(help: "What the new secret starts with (default: the key's prefix).") var prefix: String?
        @Flag(help: "Print JSON.") var json = false
        @OptionGroup var database: DatabaseOptions

        func run() async throws {
            guard let seconds = DurationText.seconds(grace) else {
                throw ValidationError("--grace must be a duration such as 0, 90s, 30m, 24h, 7d or 1h30m")
            }
            let issued = try await KeysCommand.run(database, mustExist: true) { administrator, _ in
                try await administrator.rotate(key, grace: seconds, prefix: prefix)
            }
            // The new secret's only appearance, on standard output for the operator who asked for it; never logged.
            if json {
                var writer = KeysCommand.json(issued.record)
                writer.string("key", issued.key)
                writer.string("previous_valid_until", issued.previousValidUntil.map(KeyTime.text))
                print(String(decoding: writer.finish(), as: UTF8.self))
                return
            }
            print("New secret for key \(issued.record.id) (\(KeysCommand.who(issued.record))):\n\n  \(issued.key)\n")
            print("This is the only time it is shown.")
            if let until = issued.previousValidUntil {
                print("The previous secret keeps working until \(KeyTime.text(until)).")
            } else {
                print("The previous secret stopped working: a running bridge refuses it from its next request.")
            }
        }
    }

    // MARK: import

    struct Import: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Turn a quotas.json's plaintext subkeys into managed keys, keeping their usage and rules.",
            discussion: """
                Clients keep using the same subkeys; the database keeps only their hashes. Names, e-mail addresses \
                and revoked or replaced states come from the earlier bridge's subkey_names and key_lifecycle tables \
                (and _REVOKED_ entries). --db-names also imports keys only those tables name (the earlier bridge \
                accepted them). Run it again at any time: keys already managed are left alone.
                """
        )

        @Option(name: .customLong("from-quotas"), help: "The policy file holding the subkeys.") var file: String
        @Flag(name: .customLong("db-names"), help: "Also import keys only subkey_names or key_lifecycle name.")
        var databaseNames = false
        @Flag(name: .customLong("create-db"), help: "Make the database if it does not exist yet.") var createDatabase = false
        @OptionGroup var database: DatabaseOptions

        func run() async throws {
            let policy: QuotaPolicy
            let source = PolicySource.file(file)
            guard source.exists else { throw configurationFailure("\(file): no such file") }
            do {
                policy = try source.load()
            } catch {
                throw configurationFailure(error.message)
            }
            let report = try await KeysCommand.run(database, mustExist: !createDatabase) { administrator, _ in
                try await administrator.importKeys(from: policy, source: file, includeDatabaseNames: databaseNames)
            }
            print(KeysCommand.describe(report, file: file), terminator: "")
        }
    }

    // MARK: Rendering

    static func who(_ record: KeyRecord) -> String {
        record.email.map { "\(record.name) <\($0)>" } ?? record.name
    }

    static func status(_ summary: KeyAdministrator.Summary) -> String {
        if summary.previousValidUntil != nil, summary.record.status == .active { return "active (rotating)" }
        return summary.record.status.rawValue
    }

    static func json(_ record: KeyRecord) -> JSONObjectWriter {
        var writer = JSONObjectWriter()
        writer.string("id", record.id)
        writer.string("name", record.name)
        writer.string("email", record.email)
        writer.string("status", record.status.rawValue)
        writer.string("template", record.template)
        writer.string("origin", record.origin.rawValue)
        writer.string("created_at", KeyTime.text(record.createdAt))
        writer.string("rotated_at", record.rotatedAt.map(KeyTime.text))
        writer.string("revoked_at", record.revokedAt.map(KeyTime.text))
        writer.string("revoke_reason", record.revokeReason)
        return writer
    }

    static func json(_ summary: KeyAdministrator.Summary) -> JSONObjectWriter {
        var writer = json(summary.record)
        writer.string("last_used_at", summary.lastUsed.map(KeyTime.text))
        writer.string("previous_secret_valid_until", summary.previousValidUntil.map(KeyTime.text))
        tally(summary.usage, into: &writer)
        return writer
    }

    static func tally(_ tally: Tally, into writer: inout JSONObjectWriter) {
        writer.number("requests", exact: String(tally.requests))
        writer.number("prompt_tokens", exact: String(tally.promptTokens))
        writer.number("completion_tokens", exact: String(tally.completionTokens))
        writer.number("total_tokens", exact: String(tally.totalTokens))
    }

    static func describe(_ details: KeyAdministrator.Details, policy: QuotaPolicy?) -> String {
        let summary = details.summary
        let record = summary.record
        var rows: [[String]] = [
            ["id", record.id], ["name", record.name], ["email", record.email ?? "-"],
            ["description", record.description ?? "-"],
        ]
        var status = record.status.rawValue
        if let revokedAt = record.revokedAt {
            status += " since \(KeyTime.text(revokedAt))" + (record.revokeReason.map { ": \($0)" } ?? "")
        }
        rows.append(["status", status])
        rows.append(["origin", record.origin == .imported ? "imported from a policy file" : "created"])
        rows.append(["created", KeyTime.text(record.createdAt)])
        if let rotatedAt = record.rotatedAt { rows.append(["rotated", KeyTime.text(rotatedAt)]) }
        rows.append(["last used", summary.lastUsed.map(KeyTime.text) ?? "never"])
        let now = Date().timeIntervalSince1970
        let current = details.secrets.filter { $0.expiresAt == nil }.count
        let grace = details.secrets.filter { $0.expiresAt != nil && $0.isValid(at: now) }
        var secrets = "\(current) current"
        if let until = grace.compactMap(\.expiresAt).max() {
            secrets += ", \(grace.count) previous valid until \(KeyTime.text(until))"
        }
        rows.append(["secrets", secrets + " (stored as SHA-256 only)"])
        rows.append(["template", record.template ?? "-"])
        rows.append(["own rules", record.rules ?? "-"])
        var out = TextTable.render(rows.map { [$0[0] + ":", $0[1]] }, rightAligned: [])
        if let policy {
            let rules = policy.effectiveRules(template: record.template, own: record.enforcedRules)
            out += "\neffective rules (global, then template, then own):\n"
            if record.template.map({ policy.templates[$0] == nil }) ?? false {
                out += "  the policy does not define template '\(record.template ?? "")': every model is refused\n"
            } else if rules.isEmpty {
                out += "  none: every model, no limits\n"
            } else {
                out += QuotaInspector.rulesTable(rules)
            }
        }
        out += "\nusage (lifetime):\n"
        if details.usageByModel.isEmpty {
            out += "  none\n"
        } else {
            var usage = [["model", "requests", "prompt_tokens", "completion_tokens", "total_tokens"]]
            for (model, tally) in details.usageByModel.sorted(by: { $0.value.totalTokens > $1.value.totalTokens }) {
                usage.append([
                    model, String(tally.requests), String(tally.promptTokens), String(tally.completionTokens),
                    String(tally.totalTokens),
                ])
            }
            out += TextTable.render(usage, rightAligned: [1, 2, 3, 4], indent: "  ")
        }
        out += "\nhistory:\n"
        out += TextTable.render(
            details.history.map { [KeyTime.text($0.at), $0.action, $0.detail] },
            rightAligned: [],
            indent: "  "
        )
        return out
    }

    static func describe(_ report: KeyAdministrator.ImportReport, file: String) -> String {
        guard !report.entries.isEmpty else { return "\(file) names no subkeys: nothing to import.\n" }
        var out = ""
        var rows = [["entry", "was", "key id", "name", "status", ""]]
        for entry in report.entries {
            rows.append([
                entry.ordinal.map { "#\($0)" } ?? "db", entry.hashedID, entry.record.id, entry.record.name,
                entry.record.status.rawValue, entry.isNew ? "imported" : "already managed",
            ])
        }
        out += TextTable.render(rows, rightAligned: [])
        let imported = report.imported.count
        out += "\n\(imported) imported, \(report.entries.count - imported) already managed"
        out += report.movedRows > 0 ? "; \(report.movedRows) usage rows moved to the new ids.\n" : ".\n"
        let inFile = report.entries.compactMap(\.ordinal)
        if !inFile.isEmpty || report.revokedMarkers > 0 {
            out += "\nThe registry now wins for these keys: remove them from \(file) (it keeps them in plaintext):\n"
            if !inFile.isEmpty {
                out += "  subkey entries " + inFile.map { "#\($0)" }.joined(separator: ", ")
                out += " (by position among its subkeys; `oai-to-circuit quotas check \(file) --db …` marks them MANAGED)\n"
            }
            if report.revokedMarkers > 0 {
                out += "  \(report.revokedMarkers) _REVOKED_ \(report.revokedMarkers == 1 ? "entry" : "entries")\n"
            }
            out += "Clients keep their subkeys; a running bridge uses the registry from its next request.\n"
        }
        if report.walKept {
            out += "\nNote: the bridge was reading, so older pages stay in the database's WAL until its next checkpoint.\n"
        }
        return out
    }
}

/// Durations as operators write them: `0`, `90` (seconds), `90s`, `30m`, `24h`, `7d`, `1h30m`.
enum DurationText {
    static func seconds(_ text: String) -> Double? {
        let text = text.trimmingCharacters(in: .whitespaces).lowercased()
        if let plain = Double(text), plain >= 0, plain.isFinite { return plain }
        var total = 0.0
        var number = ""
        for character in text {
            if character.isNumber || character == "." {
                number.append(character)
                continue
            }
            let unit: Double
            switch character {
            case "s": unit = 1
            case "m": unit = 60
            case "h": unit = 3_600
            case "d": unit = 86_400
            case "w": unit = 604_800
            default: return nil
            }
            guard let value = Double(number) else { return nil }
            total += value * unit
            number = ""
        }
        guard number.isEmpty, !text.isEmpty, total.isFinite else { return nil }
        return total
    }
}

/// When a command runs as root on a database that belongs to the service's user, files it created (a new database,
/// the key-change bell, a WAL left behind) are given to that user, so the service can still open them. Only regular
/// files owned by root are touched, and symbolic links are never followed.
enum FileOwnership {
    static func matchDirectory(of databasePath: String) {
        guard geteuid() == 0 else { return }
        var owner = stat()
        let directory = URL(fileURLWithPath: databasePath).deletingLastPathComponent().path
        // The database's owner when it has one other than root, else its directory's.
        if lstat(databasePath, &owner) != 0 || (owner.st_mode & S_IFMT) != S_IFREG || owner.st_uid == 0 {
            guard stat(directory, &owner) == 0, owner.st_uid != 0 else { return }
        }
        for suffix in ["", "-wal", "-shm", "-keys"] {
            var file = stat()
            let path = databasePath + suffix
            guard lstat(path, &file) == 0, (file.st_mode & S_IFMT) == S_IFREG, file.st_uid == 0 else { continue }
            _ = fchownat(AT_FDCWD, path, owner.st_uid, owner.st_gid, AT_SYMLINK_NOFOLLOW)
        }
    }
}
