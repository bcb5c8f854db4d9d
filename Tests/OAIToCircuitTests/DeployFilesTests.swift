import Foundation
import Testing

@testable import OAIToCircuit

/// The files under deploy/ that operators copy: they must stay valid and say what they claim.
@Suite struct DeployFilesTests {
    static let deploy = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("deploy")

    @Test func theQuotasExampleBlocksExpensiveModelsForMostPeopleWithMonthlyLimits() throws {
        let bytes = Array(try Data(contentsOf: Self.deploy.appendingPathComponent("quotas.json.example")))
        let policy = try QuotaPolicy.parse(bytes, source: "quotas.json.example")
        // Nobody is authorised by the example itself: no guessable key ships.
        #expect(policy.subjects.isEmpty)
        func limits(_ template: String, _ model: String) -> QuotaLimits {
            QuotaPolicy.limits(in: policy.effectiveRules(template: template, own: []), for: model)
        }
        for model in ["claude-3-opus", "claude-opus-4", "claude-opus-4-1"] {
            #expect(limits("standard", model).isBlocked, "\(model)")
            #expect(!limits("power", model).isBlocked && limits("power", model).period == .monthly, "\(model)")
        }
        let gpt4o = limits("standard", "gpt-4o")
        #expect(gpt4o.requests == 500 && gpt4o.totalTokens == 1_000_000 && gpt4o.period == .monthly)
        // `*` defaults apply to models no rule names.
        #expect(limits("standard", "gemini-2.5-pro").requests == 2_000)
        #expect(limits("trial", "gpt-4o").isBlocked && limits("trial", "gpt-4o-mini").period == .daily)
    }

    @Test func theCredentialsExampleNamesEveryVariableSecretsFirst() throws {
        let text = try String(contentsOf: Self.deploy.appendingPathComponent("credentials.env.example"), encoding: .utf8)
        // Set or shown commented out.
        let named = text.split(separator: "\n").compactMap { line -> String? in
            let body = line.hasPrefix("# ") ? line.dropFirst(2) : line[...]
            guard let equals = body.firstIndex(of: "="), body[..<equals].allSatisfy({ $0.isUppercase || $0 == "_" }),
                !body[..<equals].isEmpty
            else { return nil }
            return String(body[..<equals])
        }
        let readme = try String(
            contentsOf: Self.deploy.deletingLastPathComponent().appendingPathComponent("README.md"),
            encoding: .utf8
        )
        // Every variable of the README's configuration table.
        var documented: Set<String> = []
        for cell in readme.matches(of: /\n\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \|/) {
            for name in cell.1.matches(of: /`([A-Z_]+)`/) { documented.insert(String(name.1)) }
        }
        #expect(documented.count > 25)
        #expect(documented.subtracting(named).isEmpty, "missing: \(documented.subtracting(named).sorted())")
        #expect(Set(named).subtracting(documented).isEmpty, "not in the README: \(Set(named).subtracting(documented).sorted())")
        let secrets = ["CIRCUIT_CLIENT_ID", "CIRCUIT_CLIENT_SECRET", "CIRCUIT_APPKEY", "SPLUNK_HEC_TOKEN"]
        #expect(Array(named.prefix(4)) == secrets)
    }
}
