import ArgumentParser
import Foundation

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
            inspector.registry = try await ledger.keyRegistry()
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
