import CircuitFakes
import Foundation

/// Runs fakes for scripts (the `openai` SDK check).
///
/// `fake-circuit`: the fake Circuit and token endpoint; prints one line, `CIRCUIT_BASE=<url> TOKEN_URL=<url>`, then
/// serves until killed.
///
/// `fake-circuit hec PORT EVENTS_FILE [TOKEN [DELAY_MS]]`: a fake Splunk HEC on `PORT` (token `hec-token` unless
/// given, answering after `DELAY_MS` when given) that appends every event it indexes to `EVENTS_FILE`, one JSON line
/// each; prints `HEC_URL=<url>`.
@main
struct Entry {
    static func main() async throws {
        let arguments = CommandLine.arguments.dropFirst()
        if arguments.first == "hec" {
            let rest = Array(arguments.dropFirst())
            guard rest.count >= 2, let port = Int(rest[0]) else {
                FileHandle.standardError.write(Data("usage: fake-circuit hec PORT EVENTS_FILE [TOKEN [DELAY_MS]]\n".utf8))
                exit(64)
            }
            var settings = FakeHEC.Settings()
            settings.eventLog = rest[1]
            if rest.count > 2 { settings.token = rest[2] }
            if rest.count > 3, let delay = Int(rest[3]) { settings.delay = .milliseconds(delay) }
            let hec = try await FakeHEC.start(settings, port: port)
            FileHandle.standardOutput.write(Data("HEC_URL=\(hec.url)\n".utf8))
        } else {
            let tokens = try await FakeTokenEndpoint.start()
            var settings = FakeCircuit.Settings()
            settings.headerDelay = .seconds(3)
            settings.recordsRequests = false
            let circuit = try await FakeCircuit.start(tokens: tokens, settings: settings)
            FileHandle.standardOutput.write(Data("CIRCUIT_BASE=\(circuit.baseURL) TOKEN_URL=\(tokens.url)\n".utf8))
        }
        while true { try await Task.sleep(for: .seconds(3600)) }
    }
}
