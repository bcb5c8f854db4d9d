import ArgumentParser
import Foundation
import Logging

/// `oai-to-circuit hec test` and `hec replay`.
struct HECCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hec",
        abstract: "Check and use Splunk HTTP Event Collector delivery.",
        subcommands: [Test.self, Replay.self]
    )

    /// The bridge's configuration from the environment (and `--env-file`); a problem exits 78 as `serve` would.
    static func configuration(_ options: EnvironmentOptions) throws -> BridgeConfiguration {
        do {
            return try BridgeConfiguration(environment: try options.environment())
        } catch let error as ConfigurationError {
            throw configurationFailure(error.description)
        }
    }

    struct Test: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send one test event and explain Splunk's answer.",
            discussion: """
                The event has sourcetype SPLUNK_SOURCETYPE:test, so dashboards built on the usage and error \
                sourcetypes leave it out. Exits 0 when Splunk indexed it, 1 when it did not, 78 when \
                SPLUNK_HEC_URL or SPLUNK_HEC_TOKEN is missing or invalid.
                """
        )

        @OptionGroup var options: EnvironmentOptions

        func run() async throws {
            let configuration = try HECCommand.configuration(options)
            guard configuration.splunk.isEnabled else {
                throw configurationFailure("Splunk HEC is off: set both SPLUNK_HEC_URL and SPLUNK_HEC_TOKEN")
            }
            let report = await HECProbe.run(configuration.splunk, now: Date().timeIntervalSince1970)
            print(report.text, terminator: "")
            if !report.delivered { throw ExitCode.failure }
        }
    }

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send the usage events of past requests again, from the per-request log.",
            discussion: """
                Events are rebuilt from the request log (kept USAGE_LOG_RETENTION_DAYS) with their original time and \
                `backfill: true`, so searches can tell them apart. --since and --until are UTC days (YYYY-MM-DD), \
                inclusive; --until defaults to today. Error events are not in the log and are not replayed.
                """
        )

        @Option(help: "First day (YYYY-MM-DD, UTC).") var since: String
        @Option(help: "Last day (YYYY-MM-DD, UTC); default today.") var until: String?
        @Option(help: "Usage database (default: QUOTA_DB_PATH, else quota.db).") var db: String?
        @OptionGroup var options: EnvironmentOptions

        func run() async throws {
            guard let first = PeriodCalendar.day(parsing: since) else {
                throw ValidationError("--since must be YYYY-MM-DD")
            }
            let last = try until.map { text in
                guard let day = PeriodCalendar.day(parsing: text) else { throw ValidationError("--until must be YYYY-MM-DD") }
                return day
            }
            let configuration = try HECCommand.configuration(options)
            guard configuration.splunk.isEnabled else {
                throw configurationFailure("Splunk HEC is off: set both SPLUNK_HEC_URL and SPLUNK_HEC_TOKEN")
            }
            let path = db ?? configuration.quotaDatabasePath
            guard FileManager.default.fileExists(atPath: path) else {
                printError("error: no database at \(path)")
                throw ExitCode.failure
            }
            let lastDay = last ?? PeriodCalendar.day(Date().timeIntervalSince1970)
            guard lastDay >= first else { throw ValidationError("--until is before --since") }
            let ledger: SQLiteLedger
            do {
                ledger = try SQLiteLedger.open(path: path, readOnly: true)
            } catch {
                printError("error: cannot read \(path): \(LedgerWriter.describe(error))")
                throw ExitCode.failure
            }
            var logger = Logger(label: "oai-to-circuit", factory: { LineLogHandler(label: $0) })
            logger.logLevel = max(configuration.logLevel, .warning)
            let outcome = await HECReplay.run(
                configuration.splunk,
                ledger: ledger,
                since: Double(first) * PeriodCalendar.secondsPerDay,
                until: Double(lastDay + 1) * PeriodCalendar.secondsPerDay,
                logger: logger
            )
            try? await ledger.close()
            print(
                "replayed \(outcome.sent) usage events from \(PeriodCalendar.dayString(first)) to "
                    + "\(PeriodCalendar.dayString(lastDay))"
                    + (outcome.deadLettered > 0 ? "; Splunk refused \(outcome.deadLettered) as malformed" : "")
            )
            if let failure = outcome.failure {
                printError("error: stopped: \(failure)")
                throw ExitCode.failure
            }
        }
    }
}
