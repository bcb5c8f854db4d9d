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
