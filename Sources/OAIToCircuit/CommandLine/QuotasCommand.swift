import ArgumentParser
import Foundation

/// `--env-file` for the commands that read the bridge's configuration, merged as `serve` does: variables already
/// set (and non-empty) in the process win.
struct EnvironmentOptions: ParsableArguments {
    @Option(name: .customLong("env-file"), help: "Read KEY=VALUE lines; variables already set win.") var envFile: String?

    func environment() throws -> [String: String] {
        try EnvironmentFile.merged(into: ProcessInfo.processInfo.environment, from: envFile).filter { !$0.value.isEmpty }
    }
}

/// Prints a configuration problem on one line and exits 78, as `serve` would for the same problem.
func configurationFailure(_ message: String) -> ExitCode {
    printError("error: \(message)")
    return configurationExitCode
}

struct QuotasCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quotas",
        abstract: "Check the quota policy and explain its decisions.",
        subcommands: [Check.self, Explain.self]
    )

    /// The policy from FILE, else `QUOTAS_JSON`, else `QUOTAS_JSON_PATH` (default `quotas.json`).
    static func loadPolicy(file: String?, environment: [String: String]) throws -> (QuotaPolicy, String) {
        let source: PolicySource
        if let file {
            source = .file(file)
        } else if let inline = environment["QUOTAS_JSON"] {
            source = .inline(inline)
        } else {
            source = .file(environment["QUOTAS_JSON_PATH"] ?? "quotas.json")
        }
        guard source.exists else { throw configurationFailure("\(source): no such file") }
        do {
            return (try source.load(), source.description)
        } catch {
            throw configurationFailure(error.message)
        }
    }

    /// An inspector over the policy (from FILE or the environment) and, when `database` is given, the ledger
    /// opened read-only: its counters, names and key states.
    static func inspector(file: String?, database: String?, environment: [String: String]) async throws -> QuotaInspector {
        let (policy, source) = try loadPolicy(file: file, environment: environment)
        let now = BridgeClock.system.now()
        var inspector = QuotaInspector(policy: policy, source: source, now: now)
        guard let path = database else { return inspector }
        guard FileManager.default.fileExists(atPath: path) else {
            printError("error: no database at \(path)")
            throw ExitCode.failure
        }
        do {
            let ledger = try SQLiteLedger.open(path: path, readOnly: true)
            let today = PeriodCalendar.day(now)
            inspector.snapshot = try await ledger.snapshot(
                day: PeriodCalendar.dayString(today),
                month: PeriodCalendar.monthString(PeriodCalendar.month(ofDay: today))
            )
            inspector.directory = try await ledger.directory()
            inspector.ledgerKeys = try await ledger.ledgerKeys()
            try await ledger.close()
        } catch {
            printError("error: cannot read \(path): \(LedgerWriter.describe(error))")
            throw ExitCode.failure
        }
        return inspector
    }

    struct Check: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate the policy and print each subkey's effective rules.",
            discussion: """
                Subkeys are shown by position in the file and hashed id, never in plaintext. With --db, also lists \
                subkeys already at or over a limit (the earlier bridge never enforced token limits) and keys the \
                earlier bridge's tables know that this policy refuses. Exits 78 when the policy is invalid.
                """
        )

        @Argument(help: "Policy file (default: QUOTAS_JSON, else QUOTAS_JSON_PATH, else quotas.json).") var file: String?
        @Option(help: "Usage database to check current usage against.") var db: String?
        @OptionGroup var options: EnvironmentOptions

        func run() async throws {
            let inspector = try await QuotasCommand.inspector(file: file, database: db, environment: try options.environment())
            print(inspector.check(), terminator: "")
        }
    }

    struct Explain: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show which rule applies to a subkey and model, and what is left in the current period."
        )

        @Option(help: "The subkey (as the client sends it).") var subkey: String
        @Option(help: "The model name.") var model: String
        @Argument(help: "Policy file (default: QUOTAS_JSON, else QUOTAS_JSON_PATH, else quotas.json).") var file: String?
        @Option(help: "Usage database (default: QUOTA_DB_PATH, else quota.db).") var db: String?
        @OptionGroup var options: EnvironmentOptions

        func run() async throws {
            let environment = try options.environment()
            // The default database is used when it exists; without one, usage counts as 0.
            let path = db ?? environment["QUOTA_DB_PATH"] ?? "quota.db"
            let database = db != nil || FileManager.default.fileExists(atPath: path) ? path : nil
            let inspector = try await QuotasCommand.inspector(file: file, database: database, environment: environment)
            let (text, authorised) = inspector.explain(subkey: subkey, model: model)
            print(text, terminator: "")
            if !authorised { throw ExitCode.failure }
        }
    }
}

struct UsageCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "usage",
        abstract: "Report usage from the ledger.",
        subcommands: [Report.self]
    )

    struct Report: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Usage totals by subkey, model, day or month.",
            discussion: """
                Without dates, --by subkey and --by model read the lifetime totals (the earlier bridge's history \
                included) and --by month reads the monthly totals. --since and --until (YYYY-MM-DD or YYYY-MM, \
                inclusive) read the daily totals, which start with this bridge.
                """
        )

        @Option(help: "First day (YYYY-MM-DD) or month (YYYY-MM).") var since: String?
        @Option(help: "Last day (YYYY-MM-DD) or month (YYYY-MM).") var until: String?
        @Option(help: "Only this subkey (the key itself, its id, or its name).") var subkey: String?
        @Option(help: "Only this model.") var model: String?
        @Option(help: "Group by subkey, model, day or month.") var by: String = "subkey"
        @Option(help: "table, csv or json.") var format: String = "table"
        @Option(help: "Usage database (default: QUOTA_DB_PATH, else quota.db).") var db: String?
        @OptionGroup var options: EnvironmentOptions

        func run() async throws {
            let environment = try options.environment()
            guard let grouping = UsageQuery.Grouping(rawValue: by) else {
                throw ValidationError("--by must be subkey, model, day or month")
            }
            guard let format = UsageReport.Format(rawValue: format) else {
                throw ValidationError("--format must be table, csv or json")
            }
            var query = UsageQuery(grouping: grouping)
            query.model = model
            if let since {
                guard
                    let day = PeriodCalendar.day(parsing: since)
                        ?? PeriodCalendar.month(parsing: since).map(PeriodCalendar.firstDay)
                else { throw ValidationError("--since must be YYYY-MM-DD or YYYY-MM") }
                query.since = day
            }
            if let until {
                guard
                    let day = PeriodCalendar.day(parsing: until)
                        ?? PeriodCalendar.month(parsing: until).map({ PeriodCalendar.firstDay(ofMonth: $0 + 1) - 1 })
                else { throw ValidationError("--until must be YYYY-MM-DD or YYYY-MM") }
                query.until = day
            }
            let path = db ?? environment["QUOTA_DB_PATH"] ?? "quota.db"
            guard FileManager.default.fileExists(atPath: path) else {
                printError("error: no database at \(path)")
                throw ExitCode.failure
            }
            let names: [String: String]
            let rows: [UsageReportRow]
            do {
                let ledger = try SQLiteLedger.open(path: path, readOnly: true)
                let directory = try await ledger.directory()
                names = Self.names(directory: directory, environment: environment)
                if let subkey {
                    var ids: Set<String> = [subkey, SubkeyDigest(subkey).keyID]
                    for (id, name) in names where name == subkey || name.hasPrefix(subkey + " <") { ids.insert(id) }
                    query.keyIDs = ids
                }
                rows = try await ledger.report(query)
                try await ledger.close()
            } catch {
                printError("error: cannot read \(path): \(LedgerWriter.describe(error))")
                throw ExitCode.failure
            }
            print(UsageReport(rows: rows, grouping: grouping, names: names).render(format), terminator: "")
        }

        /// Names by key id: the earlier bridge's friendly names, else the policy entry's position.
        static func names(directory: KeyDirectory, environment: [String: String]) -> [String: String] {
            var names: [String: String] = [:]
            let source: PolicySource =
                environment["QUOTAS_JSON"].map { .inline($0) } ?? .file(environment["QUOTAS_JSON_PATH"] ?? "quotas.json")
            if let policy = try? source.load() {
                for subject in policy.subjects.values { names[subject.keyID] = "policy entry #\(subject.ordinal)" }
            }
            for (digest, entry) in directory.entries {
                guard let name = entry.friendlyName else { continue }
                names[digest.keyID] = entry.email.map { "\(name) <\($0)>" } ?? name
            }
            return names
        }
    }
}
