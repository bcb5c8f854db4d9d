import Benchmark
import OAIToCircuit

/// A request's quota checks (`QuotaEnforcer`) against a policy of 1,000 subkeys: authorising the subkey, admitting
/// the request (a reservation), then charging its tokens when Circuit answered or giving the reservation back when it
/// never got there; and an unknown subkey, refused.
func quotaBenchmarks() {
    let configuration = Benchmark.Configuration(scalingFactor: .kilo)
    let subkey = QuotaFixture.subkey(500)
    let stranger = QuotaFixture.subkey(1_000_000)

    Benchmark("QuotaEnforcer, answered: authorize, admit, charge", configuration: configuration) { benchmark, enforcer in
        try await benchmark.measureAsync {
            let caller = try await enforcer.authorize(subkey: subkey)
            let admission = try await enforcer.admit(caller, model: "gpt-4o")
            enforcer.charge(admission, usage: CircuitAnswers.usage)
        }
    } setup: {
        try QuotaFixture.enforcer()
    }

    Benchmark("QuotaEnforcer, never sent: authorize, admit, release", configuration: configuration) { benchmark, enforcer in
        try await benchmark.measureAsync {
            let caller = try await enforcer.authorize(subkey: subkey)
            await enforcer.release(try await enforcer.admit(caller, model: "gpt-4o"))
        }
    } setup: {
        try QuotaFixture.enforcer()
    }

    Benchmark("QuotaEnforcer, unknown subkey refused", configuration: configuration) { benchmark, enforcer in
        await benchmark.measureAsync {
            do {
                blackHole(try await enforcer.authorize(subkey: stranger))
                benchmark.error("an unknown subkey was authorised")
            } catch {
                blackHole(error)
            }
        }
    } setup: {
        try QuotaFixture.enforcer()
    }
}

enum QuotaFixture {
    static let subkeys = 1_000

    /// A subkey as `keys` hands them out: long and random-looking.
    static func subkey(_ index: Int) -> String {
        "sk-\(index)-" + String(repeating: "9f3bc2a7", count: 5)
    }

    static func enforcer() throws -> QuotaEnforcer {
        QuotaEnforcer(policy: try QuotaPolicy.parse(Array(policy.utf8), source: "quotas.json"), clock: .fixed)
    }

    /// A structured policy: global rules, two templates, and every subkey on one of them, with rules of its own for
    /// one model in three. Globs and a regular expression among the patterns. The measured subkey's `gpt-4o` rule is
    /// far above what a run can use, so every request is admitted.
    static let policy: String = {
        var users: [String] = []
        for index in 0..<subkeys {
            let template = index % 4 == 0 ? "heavy" : "standard"
            let own =
                index == 500
                ? #""gpt-4o": {"requests": 1000000000, "total_tokens": 1000000000000, "period": "monthly"}"#
                : index % 3 == 0 ? #""gemini-2.5-*": {"requests": \#(100 + index), "period": "daily"}"# : ""
            users.append(#""\#(subkey(index))": {"template": "\#(template)", "rules": {\#(own)}}"#)
        }
        return """
            {"_global": {"*": {"requests": 10000, "period": "monthly"}, "gpt-4*": {"total_tokens": 50000000}, \
            "claude-*": {"requests": 0}, "re:^o[0-9]+(-mini)?$": {"requests": 500, "period": "daily"}}, \
            "_templates": {"standard": {"description": "everyday use", "rules": {"gpt-4o*": {"requests": 2000, \
            "period": "daily"}, "gemini-2.5-*": {"total_tokens": 2000000}}}, "heavy": {"description": "batch jobs", \
            "rules": {"*": {"requests": null}, "o3": {"requests": 2000, "period": "daily"}}}}, \
            "_users": {\(users.joined(separator: ", "))}}
            """
    }()
}
