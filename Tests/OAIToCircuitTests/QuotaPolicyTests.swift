import Testing

@testable import OAIToCircuit

/// Section 5.1: both policy formats, model patterns, layering and validation.
@Suite struct QuotaPolicyTests {
    func parse(_ text: String) throws -> QuotaPolicy {
        try QuotaPolicy.parse(Array(text.utf8), source: "quotas.json")
    }

    func limits(_ policy: QuotaPolicy, _ subkey: String, _ model: String) throws -> QuotaLimits {
        try #require(policy.subject(for: subkey)).limits(for: model)
    }

    @Test func flatFormatOfTheEarlierBridge() throws {
        let policy = try parse(
            #"""
            {"team_member_alice": {"claude-3-opus": {"requests": 0},
                                   "gpt-4o": {"requests": 10, "total_tokens": 50000},
                                   "*": {"requests": 100, "total_tokens": 500000}},
             "bob": {}}
            """#
        )
        #expect(policy.subjects.count == 2)
        #expect(try limits(policy, "team_member_alice", "claude-3-opus").isBlocked)
        #expect(
            try limits(policy, "team_member_alice", "gpt-4o")
                == QuotaLimits(
                    requests: 10,
                    totalTokens: 50000,
                    period: .lifetime,
                    requestsPattern: "gpt-4o",
                    totalTokensPattern: "gpt-4o"
                )
        )
        let other = try limits(policy, "team_member_alice", "o3")
        #expect(other.requests == 100 && other.totalTokens == 500000 && other.period == .lifetime)
        #expect(try limits(policy, "bob", "gpt-4o").isUnlimited)
        #expect(policy.subject(for: "carol") == nil)
    }

    @Test func theExactRuleWinsAndLacksComeFromTheWildcardPeriodIncluded() throws {
        let policy = try parse(
            #"{"k": {"gpt-4o": {"requests": 10}, "*": {"requests": 100, "total_tokens": 500, "period": "monthly"}}}"#
        )
        let gpt = try limits(policy, "k", "gpt-4o")
        #expect(gpt.requests == 10 && gpt.totalTokens == 500 && gpt.period == .monthly)
        #expect(gpt.requestsPattern == "gpt-4o" && gpt.totalTokensPattern == "*" && gpt.periodPattern == "*")
    }

    @Test func nullMeansUnlimitedEvenWhenTheWildcardSetsALimit() throws {
        let policy = try parse(#"{"k": {"gpt-4o": {"total_tokens": null}, "*": {"requests": 5, "total_tokens": 10}}}"#)
        let gpt = try limits(policy, "k", "gpt-4o")
        #expect(gpt.totalTokens == nil && gpt.requests == 5)
    }

    @Test func zeroOrNegativeLimitsBlock() throws {
        let policy = try parse(
            #"{"k": {"a": {"requests": 0}, "b": {"requests": -1}, "c": {"total_tokens": 0}, "d": {"requests": 1}}}"#
        )
        #expect(try limits(policy, "k", "a").isBlocked)
        #expect(try limits(policy, "k", "b").isBlocked)
        #expect(try limits(policy, "k", "c").isBlocked)
        #expect(try !limits(policy, "k", "d").isBlocked)
    }

    @Test func structuredFormatLayersGlobalThenTemplateThenOwnRules() throws {
        let policy = try parse(
            #"""
            {"_global": {"*": {"requests": 1000, "period": "monthly"}, "claude-3-opus": {"requests": 0}},
             "_templates": {"basic": {"description": "everyday", "rules": {"gpt-4o*": {"total_tokens": 50000},
                                                                        "*": {"requests": 200}}},
                            "bare": {"o3": {"requests": 3}}},
             "_users": {"alice": {"template": "basic", "rules": {"gpt-4o": {"requests": 10}}},
                        "dave": {"template": "bare"},
                        "erin": {"gpt-4o": {"requests": 7}}},
             "bob": {"*": {"requests": 100}}}
            """#
        )
        #expect(policy.subjects.count == 4)
        #expect(policy.templates["basic"]?.description == "everyday")
        // alice: her own exact rule, the template's glob for the token limit, the template's `*` over the global one.
        let gpt = try limits(policy, "alice", "gpt-4o")
        #expect(gpt.requests == 10 && gpt.totalTokens == 50000 && gpt.period == .monthly)
        let mini = try limits(policy, "alice", "gpt-4o-mini")
        #expect(mini.requests == 200 && mini.totalTokens == 50000)
        #expect(try limits(policy, "alice", "claude-3-opus").isBlocked)
        // A template written as a bare rule map.
        #expect(try limits(policy, "dave", "o3").requests == 3)
        // A `_users` entry without template or rules fields is a rule map.
        #expect(try limits(policy, "erin", "gpt-4o").requests == 7)
        // A flat entry still gets the global rules.
        #expect(try limits(policy, "bob", "claude-3-opus").isBlocked)
        let bob = try limits(policy, "bob", "o3")
        #expect(bob.requests == 100 && bob.period == .monthly)
        let origins = try #require(policy.subject(for: "bob")?.rules.first { $0.pattern.text == "*" }?.origins)
        #expect(origins == [.global, .own])
    }

    @Test func aSubkeyAtTheTopLevelAndUnderUsersIsOneSubkey() throws {
        let policy = try parse(
            #"{"_templates": {"t": {"rules": {"o3": {"requests": 1}}}}, "k": {"gpt-4o": {"requests": 2}}, "_users": {"k": {"template": "t", "rules": {"gpt-4o": {"total_tokens": 9}}}}}"#
        )
        #expect(policy.subjects.count == 1)
        #expect(try limits(policy, "k", "o3").requests == 1)
        let gpt = try limits(policy, "k", "gpt-4o")
        #expect(gpt.requests == 2 && gpt.totalTokens == 9)
    }

    @Test func theMostSpecificPatternWins() throws {
        let policy = try parse(
            #"""
            {"k": {"*": {"requests": 1}, "gpt-*": {"requests": 2}, "gpt-4o*": {"requests": 3},
                   "re:gpt-4o-(mini|nano)": {"requests": 4}, "gpt-4o-mini": {"requests": 5},
                   "claude-?-opus": {"requests": 6}, "re:.*opus.*": {"requests": 0}}}
            """#
        )
        #expect(try limits(policy, "k", "gpt-4o-mini").requests == 5)  // exact
        #expect(try limits(policy, "k", "gpt-4o-nano").requests == 4)  // a regular expression beats globs
        #expect(try limits(policy, "k", "gpt-4o-audio").requests == 3)  // more literal characters
        #expect(try limits(policy, "k", "gpt-3.5").requests == 2)
        #expect(try limits(policy, "k", "o3").requests == 1)
        #expect(try limits(policy, "k", "claude-3-opus").isBlocked)  // the regex beats the glob
        #expect(try limits(policy, "k", "claude-opus-4").isBlocked)
        // A regular expression must match the whole name.
        #expect(try limits(policy, "k", "gpt-4o-mini-2").requests == 3)
    }

    @Test func globMatching() {
        func glob(_ pattern: String, _ name: String) -> Bool {
            ModelPattern.glob(Array(pattern.utf8), matches: Array(name.utf8))
        }
        #expect(glob("gpt-*", "gpt-4o"))
        #expect(glob("gpt-*", "gpt-"))
        #expect(!glob("gpt-*", "gpt"))
        #expect(glob("*-mini", "gpt-4o-mini"))
        #expect(glob("*4o*", "gpt-4o-mini"))
        #expect(glob("claude-?-opus", "claude-3-opus"))
        #expect(!glob("claude-?-opus", "claude-35-opus"))
        #expect(glob("a*b*c", "aXXbYYc"))
        #expect(!glob("a*b*c", "aXXbYY"))
        #expect(glob("**", ""))
    }

    @Test func unknownFieldsAndUnderscoreEntriesAreToleratedAndReported() throws {
        let policy = try parse(
            #"{"k": {"gpt-4o": {"requests": 1, "pricing_tier": "payg", "backend_id": "x"}}, "_REVOKED_oldkey": {"*": {}}, "_comment": "hello", "_REVOKED_oldkey": {}}"#
        )
        #expect(policy.subjects.count == 1)
        #expect(try limits(policy, "k", "gpt-4o").requests == 1)
        #expect(policy.warnings.contains("ignored fields this bridge does not use: backend_id, pricing_tier"))
        #expect(policy.warnings.contains("ignored 3 top-level entries starting with '_' (never subkeys)"))
        // A warning never names a key: `_REVOKED_<key>` entries hold one.
        #expect(!policy.warnings.joined().contains("oldkey"))
    }

    @Test func aTopLevelEntryMayUseTheStructuredShape() throws {
        let policy = try parse(
            #"{"_templates": {"t": {"o3": {"requests": 2}}}, "alice": {"template": "t", "rules": {"gpt-4o": {"requests": 5}}}, "_users": {"_note": {}, "bob": {}}}"#
        )
        #expect(try limits(policy, "alice", "gpt-4o").requests == 5)
        #expect(try limits(policy, "alice", "o3").requests == 2)
        // Keys starting with `_` are never subkeys, under `_users` either.
        #expect(policy.subject(for: "_note") == nil && policy.subject(for: "bob") != nil)
    }

    @Test func countsSaturateInsteadOfTrapping() {
        var tally = Tally(totalTokens: .max - 5)
        tally.add(Usage(promptTokens: 10, completionTokens: 10))
        #expect(tally.totalTokens == .max && tally.promptTokens == 10)
        tally.add(Tally(requests: .max, totalTokens: 1))
        tally.add(Tally(requests: 1))
        #expect(tally.requests == .max && tally.totalTokens == .max)
    }

    @Test func numbersAreWholeNumbersHoweverWritten() throws {
        let policy = try parse(#"{"k": {"a": {"requests": 1e2}, "b": {"requests": 50.0}}}"#)
        #expect(try limits(policy, "k", "a").requests == 100)
        #expect(try limits(policy, "k", "b").requests == 50)
    }

    @Test(arguments: [
        (#"[]"#, "quotas.json: must be a JSON object, not an array"),
        (#"{"k": "#, "quotas.json: not valid JSON"),
        (#"{"k": []}"#, "quotas.json: subkey entry #1 (KEY) must be an object of model rules, not an array"),
        (
            #"{"k": {"gpt-4o": 5}}"#,
            #"quotas.json: subkey entry #1 (KEY) → 'gpt-4o' must be an object like {"requests": 100}, not a number"#
        ),
        (
            #"{"k": {"gpt-4o": {"requests": "10"}}}"#,
            "quotas.json: subkey entry #1 (KEY) → 'gpt-4o' → requests must be a whole number or null, not a string"
        ),
        (
            #"{"k": {"gpt-4o": {"total_tokens": 1.5}}}"#,
            "quotas.json: subkey entry #1 (KEY) → 'gpt-4o' → total_tokens must be a whole number or null, not a number"
        ),
        (
            #"{"k": {"*": {"period": "weekly"}}}"#,
            #"quotas.json: subkey entry #1 (KEY) → '*' → period must be "lifetime", "daily" or "monthly", not "weekly""#
        ),
        (
            #"{"k": {"re:gpt-(": {}}}"#,
            "quotas.json: subkey entry #1 (KEY): model pattern 're:gpt-(' is not a valid regular expression"
        ),
        (
            #"{"_users": {"k": {"template": "gold"}}}"#,
            "quotas.json: subkey entry #1 (KEY) → template 'gold' is not defined in _templates"
        ),
        (#"{"k": {}, "k": {}}"#, "quotas.json: subkey entry #1 (KEY) appears twice"),
        (#"{"k": {"a": {}, "a": {}}}"#, "quotas.json: subkey entry #1 (KEY) → 'a' appears twice"),
        (
            #"{"_global": {"*": {"requests": true}}}"#,
            "quotas.json: _global → '*' → requests must be a whole number or null, not a boolean"
        ),
        (
            #"{"_templates": {"t": {"rules": []}}}"#,
            "quotas.json: _templates → 't' → rules must be an object of model rules, not an array"
        ),
        (#"{"_users": []}"#, "quotas.json: _users must be an object of subkeys, not an array"),
        (#"{"": {}}"#, "quotas.json: a subkey entry has an empty key"),
        (#"{"_global": {}, "_global": {}}"#, "quotas.json: _global appears twice"),
        (#"{"anonymous": {}}"#, "quotas.json: the subkey 'anonymous' is reserved for requests without a subkey; rename it"),
        (
            #"{"k": {"gpt-4o": {"gpt-4o": {"requests": 1}}}}"#,
            "quotas.json: subkey entry #1 (KEY) → 'gpt-4o' holds 'gpt-4o' as an object, not limits; is a rule nested one level too deep?"
        ),
        (
            #"{"k": {"*": {"requests": 1e30}}}"#,
            "quotas.json: subkey entry #1 (KEY) → '*' → requests is too large (1e30); use null for no limit"
        ),
    ])
    func invalidPoliciesAreRejectedNamingTheEntry(document: String, message: String) throws {
        // The subkey is "k" in the table; here it is a longer secret, which the message must not contain.
        let secret = "s3cr3t-subkey"
        let expected = message.replacingOccurrences(of: "KEY", with: Caller.hash(secret))
        let error = #expect(throws: PolicyError.self) {
            try parse(document.replacingOccurrences(of: #""k""#, with: "\"\(secret)\""))
        }
        #expect(error?.message == expected)
        #expect(error?.message.contains(secret) == false)
    }

    @Test func patternsThatCanNeverMatchAreWarnedAbout() throws {
        let policy = try parse(#"{"k": {"gpt 4o": {}, "gpt/*": {}, "gpt-4o": {}}}"#)
        #expect(policy.warnings.filter { $0.contains("can never match") }.count == 2)
    }

    @Test func periodCalendarIsUTC() {
        // 2024-02-29T23:59:59Z, a leap day.
        let leap = 1_709_251_199.0
        let day = PeriodCalendar.day(leap)
        #expect(PeriodCalendar.dayString(day) == "2024-02-29")
        #expect(PeriodCalendar.monthString(PeriodCalendar.month(ofDay: day)) == "2024-02")
        #expect(PeriodCalendar.end(of: .daily, at: leap) == leap + 1)
        #expect(PeriodCalendar.end(of: .monthly, at: leap) == leap + 1)
        #expect(PeriodCalendar.end(of: .lifetime, at: leap) == nil)
        // 2026-12-31T12:00:00Z: the month ends at the new year.
        let december = 1_798_718_400.0
        #expect(PeriodCalendar.end(of: .monthly, at: december) == 1_798_761_600)
        #expect(PeriodCalendar.day(parsing: "2024-02-29") == day)
        #expect(PeriodCalendar.day(parsing: "2023-02-29") == nil)
        #expect(PeriodCalendar.month(parsing: "2024-13") == nil)
        #expect(PeriodCalendar.timestamp(1_795_945_845.5) == "2026-11-29T09:50:45.500000Z")
        #expect(PeriodCalendar.timestamp(0) == "1970-01-01T00:00:00.000000Z")
        #expect(PeriodCalendar.timestamp(-0.000_001) == "1969-12-31T23:59:59.999999Z")
        #expect(PeriodCalendar.timestamp(4_102_444_799.25) == "2099-12-31T23:59:59.250000Z")
        // Padding: short years and single-digit parts; a five-digit year keeps all its digits.
        #expect(PeriodCalendar.dayString(PeriodCalendar.days(year: 999, month: 1, day: 5)) == "0999-01-05")
        #expect(PeriodCalendar.monthString(10_000 * 12 + 8) == "10000-09")
        #expect(PeriodCalendar.dayString(PeriodCalendar.days(year: 12_345, month: 11, day: 30)) == "12345-11-30")
        for sample in stride(from: -800_000, to: 800_000, by: 997) {
            let (year, month, dayOfMonth) = PeriodCalendar.civil(sample)
            #expect(PeriodCalendar.days(year: year, month: month, day: dayOfMonth) == sample)
        }
    }
}
