import CircuitFakes
import Foundation

/// Runs the fake Circuit and token endpoint for scripts (the `openai` SDK check): prints one line,
/// `CIRCUIT_BASE=<url> TOKEN_URL=<url>`, then serves until killed.
@main
struct Entry {
    static func main() async throws {
        let tokens = try await FakeTokenEndpoint.start()
        var settings = FakeCircuit.Settings()
        settings.headerDelay = .seconds(3)
        settings.recordsRequests = false
        let circuit = try await FakeCircuit.start(tokens: tokens, settings: settings)
        FileHandle.standardOutput.write(Data("CIRCUIT_BASE=\(circuit.baseURL) TOKEN_URL=\(tokens.url)\n".utf8))
        while true { try await Task.sleep(for: .seconds(3600)) }
    }
}
