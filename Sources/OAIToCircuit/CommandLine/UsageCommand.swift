import ArgumentParser
import Foundation

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
                let registry = try await ledger.keyRegistry()
                names = Self.names(directory: directory, registry: registry, environment: environment)
                if let subkey {
                    var ids: Set<String> = [subkey, SubkeyDigest(subkey).keyID]
                    // A managed key's secret names its id.
                    let digest = SubkeyDigest(subkey)
                    for secret in registry.secrets where SubkeyDigest(hash: secret.hash) == digest { ids.insert(secret.keyID) }
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

        /// Names by key id: the registry's names, the earlier bridge's friendly names, else the policy entry's position.
        static func names(
            directory: KeyDirectory,
            registry: KeyRegistryContents,
            environment: [String: String]
        ) -> [String: String] {
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
            for key in registry.keys { names[key.id] = key.email.map { "\(key.name) <\($0)>" } ?? key.name }
            return names
        }
    }
}
