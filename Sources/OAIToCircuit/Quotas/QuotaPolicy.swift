import Crypto

/// How long a limit's count runs before it starts again from zero, on UTC calendar boundaries.
public enum QuotaPeriod: String, Sendable, CaseIterable {
    case lifetime
    case daily
    case monthly
}

/// One limit field as a rule writes it.
public enum QuotaLimit: Sendable, Equatable {
    /// `null`: no limit, even if a less specific rule sets one.
    case unlimited
    /// A number; 0 or below blocks the model.
    case limit(Int64)
}

/// One rule as the policy writes it. A field left out (`nil`) comes from a less specific rule.
public struct QuotaRule: Sendable, Equatable {
    public var requests: QuotaLimit?
    public var totalTokens: QuotaLimit?
    public var period: QuotaPeriod?
    /// Fields this bridge does not use (`pricing_tier`, `backend_id`, …): kept, reported, never an error.
    public var ignoredFields: [String] = []

    public init(
        requests: QuotaLimit? = nil,
        totalTokens: QuotaLimit? = nil,
        period: QuotaPeriod? = nil,
        ignoredFields: [String] = []
    ) {
        self.requests = requests
        self.totalTokens = totalTokens
        self.period = period
        self.ignoredFields = ignoredFields
    }

    /// This rule with the fields `override` sets replaced (a later layer of the structured format).
    func merged(with override: QuotaRule) -> QuotaRule {
        var merged = self
        if let requests = override.requests { merged.requests = requests }
        if let totalTokens = override.totalTokens { merged.totalTokens = totalTokens }
        if let period = override.period { merged.period = period }
        for field in override.ignoredFields where !merged.ignoredFields.contains(field) {
            merged.ignoredFields.append(field)
        }
        return merged
    }
}

/// Where a rule of a subkey's effective set came from.
public enum RuleOrigin: Sendable, Equatable, CustomStringConvertible {
    case global
    case template(String)
    case own

    public var description: String {
        switch self {
        case .global: "_global"
        case .template(let name): "template '\(name)'"
        case .own: "own"
        }
    }
}

/// A pattern and its rule, in a subkey's effective set.
public struct PolicyRule: Sendable {
    public var pattern: ModelPattern
    public var rule: QuotaRule
    /// Every layer that contributed, in order (global, template, own).
    public var origins: [RuleOrigin]
}

/// What applies to one subkey and model, once the policy is resolved.
public struct QuotaLimits: Sendable, Equatable {
    /// `nil`: unlimited.
    public var requests: Int64?
    public var totalTokens: Int64?
    public var period: QuotaPeriod
    /// The pattern each field came from, for `quotas explain` (`nil` when no rule sets it).
    public var requestsPattern: String?
    public var totalTokensPattern: String?
    public var periodPattern: String?

    public static let unlimited = QuotaLimits(requests: nil, totalTokens: nil, period: .lifetime)
    /// Every model refused (403 `model_not_allowed`).
    public static let blocked = QuotaLimits(requests: 0, totalTokens: nil, period: .lifetime)

    public init(
        requests: Int64?,
        totalTokens: Int64?,
        period: QuotaPeriod,
        requestsPattern: String? = nil,
        totalTokensPattern: String? = nil,
        periodPattern: String? = nil
    ) {
        self.requests = requests
        self.totalTokens = totalTokens
        self.period = period
        self.requestsPattern = requestsPattern
        self.totalTokensPattern = totalTokensPattern
        self.periodPattern = periodPattern
    }

    /// A limit of 0 or below blocks the model (403 `model_not_allowed`).
    public var isBlocked: Bool { (requests.map { $0 <= 0 } ?? false) || (totalTokens.map { $0 <= 0 } ?? false) }

    public var isUnlimited: Bool { requests == nil && totalTokens == nil }
}

/// A subkey the policy file names, and its effective rules (global, then its template, then its own).
public struct PolicySubject: Sendable {
    /// The key as the file writes it: the `usage` table's `subkey` for it. A secret: never logged or printed.
    public let subkey: String
    public let digest: SubkeyDigest
    public let template: String?
    /// Most specific first.
    public let rules: [PolicyRule]
    /// Its own rules as the file writes them (without `_global` and its template): what `keys import` keeps.
    public let ownRules: [(pattern: ModelPattern, rule: QuotaRule)]
    /// Its position among the file's subkeys (1-based), to name it in messages without naming the secret.
    public let ordinal: Int

    public var keyID: String { digest.keyID }

    /// The limits for `model`: each field from the most specific matching rule that sets it.
    public func limits(for model: String) -> QuotaLimits {
        QuotaPolicy.limits(in: rules, for: model)
    }
}

/// A policy that does not parse or validate; the message names the entry (a subkey by position and hashed id).
public struct PolicyError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The quota policy (contract section 5.1): the earlier bridge's flat format, where top-level keys are subkeys
/// mapping model patterns to rules, and the structured format with `_global` rules, `_templates` (each with
/// `rules` and a `description`) and `_users` (each with a `template` and `rules`). Both may appear in one file; a
/// subkey named in both has its entries merged. Other keys starting with `_` are never subkeys and are ignored.
public struct QuotaPolicy: Sendable {
    public struct Template: Sendable {
        public var description: String
        public var rules: [(pattern: ModelPattern, rule: QuotaRule)]
    }

    public private(set) var subjects: [SubkeyDigest: PolicySubject] = [:]
    public private(set) var global: [(pattern: ModelPattern, rule: QuotaRule)] = []
    public private(set) var templates: [String: Template] = [:]
    /// Subkeys the earlier bridge marked revoked with a `_REVOKED_<subkey>` entry, with the entry's `reason` and
    /// `revoked_at` when it has them.
    public private(set) var revokedMarkers: [SubkeyDigest: (reason: String?, revokedAt: String?)] = [:]
    /// Things worth telling the operator that do not make the policy invalid.
    public private(set) var warnings: [String] = []

    public static let empty = QuotaPolicy()

    public init() {}

    public func subject(for subkey: String) -> PolicySubject? { subjects[SubkeyDigest(subkey)] }

    /// Subjects in the file's order.
    public var orderedSubjects: [PolicySubject] { subjects.values.sorted { $0.ordinal < $1.ordinal } }

    /// The effective rules of a subkey with `template` (if any) and its `own` rules: global, then the template, then
    /// its own, merged field by field for the same pattern; most specific first.
    public func effectiveRules(
        template: String?,
        own: [(pattern: ModelPattern, rule: QuotaRule)]
    ) -> [PolicyRule] {
        var merged: [PolicyRule] = []
        var index: [String: Int] = [:]
        func add(_ layer: [(pattern: ModelPattern, rule: QuotaRule)], origin: RuleOrigin) {
            for (pattern, rule) in layer {
                if let at = index[pattern.text] {
                    merged[at].rule = merged[at].rule.merged(with: rule)
                    merged[at].origins.append(origin)
                } else {
                    index[pattern.text] = merged.count
                    merged.append(PolicyRule(pattern: pattern, rule: rule, origins: [origin]))
                }
            }
        }
        add(global, origin: .global)
        if let template, let rules = templates[template]?.rules { add(rules, origin: .template(template)) }
        add(own, origin: .own)
        return merged.sorted { $0.pattern.isMoreSpecific(than: $1.pattern) }
    }

    static func limits(in rules: [PolicyRule], for model: String) -> QuotaLimits {
        var requests: QuotaLimit?
        var totalTokens: QuotaLimit?
        var period: QuotaPeriod?
        var limits = QuotaLimits.unlimited
        for entry in rules where entry.pattern.matches(model) {
            if requests == nil, let value = entry.rule.requests {
                requests = value
                limits.requestsPattern = entry.pattern.text
            }
            if totalTokens == nil, let value = entry.rule.totalTokens {
                totalTokens = value
                limits.totalTokensPattern = entry.pattern.text
            }
            if period == nil, let value = entry.rule.period {
                period = value
                limits.periodPattern = entry.pattern.text
            }
            if requests != nil, totalTokens != nil, period != nil { break }
        }
        if case .limit(let value) = requests { limits.requests = value }
        if case .limit(let value) = totalTokens { limits.totalTokens = value }
        limits.period = period ?? .lifetime
        return limits
    }

    // MARK: Parsing

    /// Parses and validates a policy document. `source` names it in messages (`quotas.json`, `QUOTAS_JSON`).
    public static func parse(_ bytes: [UInt8], source: String) throws(PolicyError) -> QuotaPolicy {
        let document: JSONValue
        do {
            document = try JSONValue.parse(bytes)
        } catch {
            throw PolicyError("\(source): not valid JSON")
        }
        guard case .object(let members) = document else {
            throw PolicyError("\(source): must be a JSON object, not \(document.kind)")
        }
        var parser = Parser(source: source)
        return try parser.parse(members)
    }

    /// A managed key's own rules: a JSON object of model patterns to rules, as a subkey's entry in the file writes
    /// them. `source` names it in messages.
    public static func parseRules(
        _ bytes: [UInt8],
        source: String
    ) throws(PolicyError) -> [(pattern: ModelPattern, rule: QuotaRule)] {
        let document: JSONValue
        do {
            document = try JSONValue.parse(bytes)
        } catch {
            throw PolicyError("\(source): not valid JSON")
        }
        var parser = Parser(source: source)
        return try parser.rules(document, at: "rules")
    }

    /// Rules as JSON in the file's own form (`{"gpt-4o": {"requests": 10, "period": "daily"}}`), fields a rule does
    /// not set left out, and `null` for an explicit "no limit". Fields this bridge ignores are not kept.
    public static func rulesJSON(_ rules: [(pattern: ModelPattern, rule: QuotaRule)]) -> String {
        var out: [UInt8] = [UInt8(ascii: "{")]
        for (index, (pattern, rule)) in rules.enumerated() {
            if index > 0 { out += Array(", ".utf8) }
            JSONString.encode(pattern.text, into: &out)
            var writer = JSONObjectWriter()
            func limit(_ name: String, _ value: QuotaLimit?) {
                switch value {
                case nil: break
                case .unlimited: writer.number(name, exact: "null")
                case .limit(let number): writer.number(name, exact: String(number))
                }
            }
            limit("requests", rule.requests)
            limit("total_tokens", rule.totalTokens)
            if let period = rule.period { writer.string("period", period.rawValue) }
            out += Array(": ".utf8) + writer.finish()
        }
        out.append(UInt8(ascii: "}"))
        return String(decoding: out, as: UTF8.self)
    }

    private struct Parser {
        let source: String
        var policy = QuotaPolicy()
        var ignoredFields: Set<String> = []
        var ignoredEntries = 0

        /// Each subkey's entries in file order: the template it names and its own rules.
        struct Entry {
            var subkey: String
            var template: String?
            var rules: [(pattern: ModelPattern, rule: QuotaRule)] = []
        }
        var entries: [Entry] = []
        var entryIndex: [String: Int] = [:]

        /// The earlier bridge's `rotate_key.py` left `_REVOKED_<subkey>` beside a revoked subkey's zeroed rules.
        static let revokedPrefix = "_REVOKED_"

        init(source: String) { self.source = source }

        mutating func parse(_ members: [JSONMember]) throws(PolicyError) -> QuotaPolicy {
            var seen: Set<String> = []
            for member in members {
                // Other `_` entries are ignored, so their repeats are too (and their names may hold a key).
                let isIgnored = member.key.hasPrefix("_") && !["_global", "_templates", "_users"].contains(member.key)
                guard seen.insert(member.key).inserted || isIgnored else {
                    throw PolicyError("\(source): \(name(ofKey: member.key)) appears twice")
                }
                switch member.key {
                case "_global":
                    policy.global = try rules(member.value, at: "_global")
                case "_templates":
                    try parseTemplates(member.value)
                case "_users":
                    guard case .object(let users) = member.value else {
                        throw PolicyError("\(source): _users must be an object of subkeys, not \(member.value.kind)")
                    }
                    var seenUsers: Set<String> = []
                    for user in users {
                        if user.key.hasPrefix("_") {
                            ignoredEntries += 1
                            continue
                        }
                        guard seenUsers.insert(user.key).inserted else {
                            throw PolicyError("\(source): _users: \(subkeyName(user.key)) appears twice")
                        }
                        try parseUser(user.key, user.value)
                    }
                case _ where member.key.hasPrefix("_"):
                    if member.key.hasPrefix(Self.revokedPrefix), member.key.count > Self.revokedPrefix.count {
                        let subkey = String(member.key.dropFirst(Self.revokedPrefix.count))
                        func text(_ name: String) -> String? {
                            guard case .object(let fields) = member.value,
                                case .string(let value)? = fields.first(where: { $0.key == name })?.value
                            else { return nil }
                            return value
                        }
                        policy.revokedMarkers[SubkeyDigest(subkey)] = (text("reason"), text("revoked_at"))
                    }
                    ignoredEntries += 1
                default:
                    try parseUser(member.key, member.value)
                }
            }
            try finish()
            return policy
        }

        mutating func parseTemplates(_ value: JSONValue) throws(PolicyError) {
            guard case .object(let templates) = value else {
                throw PolicyError("\(source): _templates must be an object of templates, not \(value.kind)")
            }
            for template in templates {
                let at = "_templates → '\(template.key)'"
                guard policy.templates[template.key] == nil else { throw PolicyError("\(source): \(at) appears twice") }
                guard case .object(let fields) = template.value else {
                    throw PolicyError("\(source): \(at) must be an object, not \(template.value.kind)")
                }
                var description = ""
                var rules: [(pattern: ModelPattern, rule: QuotaRule)] = []
                if fields.contains(where: { $0.key == "rules" || $0.key == "description" }) {
                    for field in fields {
                        switch field.key {
                        case "rules": rules = try self.rules(field.value, at: "\(at) → rules")
                        case "description":
                            guard case .string(let text) = field.value else {
                                throw PolicyError("\(source): \(at) → description must be a string")
                            }
                            description = text
                        default: ignoredFields.insert(field.key)
                        }
                    }
                } else {
                    rules = try self.rules(template.value, at: at)
                }
                policy.templates[template.key] = Template(description: description, rules: rules)
            }
        }

        /// A subkey's entry, at the top level or under `_users`: a map of rules, or an object with `template`
        /// and/or `rules` (as the earlier bridge read both places).
        mutating func parseUser(_ subkey: String, _ value: JSONValue) throws(PolicyError) {
            let at = subkeyName(subkey)
            guard !subkey.isEmpty else { throw PolicyError("\(source): a subkey entry has an empty key") }
            guard subkey != Caller.anonymousKey else {
                throw PolicyError(
                    "\(source): the subkey 'anonymous' is reserved for requests without a subkey; rename it"
                )
            }
            guard case .object(let fields) = value else {
                throw PolicyError("\(source): \(at) must be an object of model rules, not \(value.kind)")
            }
            var template: String?
            var rules: [(pattern: ModelPattern, rule: QuotaRule)] = []
            let isStructured = fields.contains { ["rules", "template", "backend_id", "backend"].contains($0.key) }
            if isStructured {
                for field in fields {
                    switch field.key {
                    case "rules": rules = try self.rules(field.value, at: "\(at) → rules")
                    case "template":
                        switch field.value {
                        case .string(let name) where !name.isEmpty: template = name
                        case .string, .null: template = nil
                        default: throw PolicyError("\(source): \(at) → template must be a string")
                        }
                    default: ignoredFields.insert(field.key)
                    }
                }
            } else {
                rules = try self.rules(value, at: at)
            }
            if subkey.first?.isWhitespace == true || subkey.last?.isWhitespace == true {
                policy.warnings.append(
                    "\(at) starts or ends with whitespace; clients cannot present it (headers are trimmed)"
                )
            }
            if let existing = entryIndex[subkey] {
                // Named both at the top level and under _users: one subkey, rules merged (the later entry wins).
                if let template { entries[existing].template = template }
                entries[existing].rules.append(contentsOf: rules)
            } else {
                entryIndex[subkey] = entries.count
                entries.append(Entry(subkey: subkey, template: template, rules: rules))
            }
        }

        /// A map from model patterns to rules.
        mutating func rules(_ value: JSONValue, at: String) throws(PolicyError) -> [(pattern: ModelPattern, rule: QuotaRule)] {
            guard case .object(let members) = value else {
                throw PolicyError("\(source): \(at) must be an object of model rules, not \(value.kind)")
            }
            var rules: [(pattern: ModelPattern, rule: QuotaRule)] = []
            var seen: Set<String> = []
            for member in members {
                let where_ = "\(at) → '\(member.key)'"
                guard seen.insert(member.key).inserted else { throw PolicyError("\(source): \(where_) appears twice") }
                let pattern: ModelPattern
                do {
                    pattern = try ModelPattern(member.key)
                } catch {
                    throw PolicyError("\(source): \(at): \(error.message)")
                }
                if !pattern.canMatchSomeModel {
                    policy.warnings.append("\(where_) can never match a model name")
                }
                rules.append((pattern, try rule(member.value, at: where_)))
            }
            return rules
        }

        mutating func rule(_ value: JSONValue, at: String) throws(PolicyError) -> QuotaRule {
            guard case .object(let fields) = value else {
                throw PolicyError("\(source): \(at) must be an object like {\"requests\": 100}, not \(value.kind)")
            }
            var rule = QuotaRule()
            for field in fields {
                switch field.key {
                case "requests": rule.requests = try limit(field.value, at: "\(at) → requests")
                case "total_tokens": rule.totalTokens = try limit(field.value, at: "\(at) → total_tokens")
                case "period":
                    switch field.value {
                    case .null: rule.period = nil
                    case .string(let text):
                        guard let period = QuotaPeriod(rawValue: text.lowercased()) else {
                            throw PolicyError(
                                "\(source): \(at) → period must be \"lifetime\", \"daily\" or \"monthly\", not \"\(text)\""
                            )
                        }
                        rule.period = period
                    default:
                        throw PolicyError("\(source): \(at) → period must be a string, not \(field.value.kind)")
                    }
                default:
                    rule.ignoredFields.append(field.key)
                    ignoredFields.insert(field.key)
                }
            }
            // No limit field but an object inside: a model's rules written one level too deep, which would
            // otherwise pass as "no limits".
            if rule.requests == nil, rule.totalTokens == nil, rule.period == nil,
                let nested = fields.first(where: { if case .object = $0.value { true } else { false } })
            {
                throw PolicyError(
                    "\(source): \(at) holds '\(nested.key)' as an object, not limits; is a rule nested one level too deep?"
                )
            }
            return rule
        }

        func limit(_ value: JSONValue, at: String) throws(PolicyError) -> QuotaLimit {
            if value == .null { return .unlimited }
            guard let number = value.integer else {
                if case .number(let text) = value, let double = Double(text), double.rounded() == double {
                    throw PolicyError("\(source): \(at) is too large (\(text)); use null for no limit")
                }
                throw PolicyError("\(source): \(at) must be a whole number or null, not \(value.kind)")
            }
            return .limit(number)
        }

        mutating func finish() throws(PolicyError) {
            for (position, entry) in entries.enumerated() {
                if let template = entry.template, policy.templates[template] == nil {
                    throw PolicyError(
                        "\(source): \(subkeyName(entry.subkey)) → template '\(template)' is not defined in _templates"
                    )
                }
                // The same pattern twice for one subkey (top level and _users): the later entry's fields win.
                var own: [(pattern: ModelPattern, rule: QuotaRule)] = []
                var index: [String: Int] = [:]
                for (pattern, rule) in entry.rules {
                    if let at = index[pattern.text] {
                        own[at].rule = own[at].rule.merged(with: rule)
                    } else {
                        index[pattern.text] = own.count
                        own.append((pattern, rule))
                    }
                }
                let digest = SubkeyDigest(entry.subkey)
                policy.subjects[digest] = PolicySubject(
                    subkey: entry.subkey,
                    digest: digest,
                    template: entry.template,
                    rules: policy.effectiveRules(template: entry.template, own: own),
                    ownRules: own,
                    ordinal: position + 1
                )
            }
            if !ignoredFields.isEmpty {
                policy.warnings.append(
                    "ignored fields this bridge does not use: \(ignoredFields.sorted().joined(separator: ", "))"
                )
            }
            if ignoredEntries > 0 {
                policy.warnings.append(
                    "ignored \(ignoredEntries) top-level \(ignoredEntries == 1 ? "entry" : "entries") starting with '_' (never subkeys)"
                )
            }
        }

        /// Names a subkey entry without the secret: its position among subkeys and its hashed id.
        func subkeyName(_ subkey: String) -> String {
            let position = (entryIndex[subkey] ?? entries.count) + 1
            return "subkey entry #\(position) (\(SubkeyDigest(subkey).keyID))"
        }

        func name(ofKey key: String) -> String {
            key.hasPrefix("_") ? key : subkeyName(key)
        }
    }
}

/// SHA-256 of a subkey. The policy and the key registry look keys up by it, so neither ever compares a secret, and
/// its equality is constant-time: how long a lookup takes says nothing about how close a guess came. Its first 8
/// bytes in hex are a policy-file key's non-secret id.
public struct SubkeyDigest: Hashable, Sendable {
    /// The 32 bytes as four big-endian words.
    private let words: (UInt64, UInt64, UInt64, UInt64)

    public init(_ subkey: String) {
        self.words = SHA256.hash(data: Array(subkey.utf8)).withUnsafeBytes(Self.words)
    }

    /// A digest already computed (as the registry stores it); `nil` unless it has 32 bytes.
    public init?(hash bytes: [UInt8]) {
        guard bytes.count == 32 else { return nil }
        self.words = bytes.withUnsafeBytes(Self.words)
    }

    private static func words(_ raw: UnsafeRawBufferPointer) -> (UInt64, UInt64, UInt64, UInt64) {
        func word(_ index: Int) -> UInt64 { UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self)) }
        return (word(0), word(1), word(2), word(3))
    }

    /// `sha256:` and the first 16 hex digits (the first eight bytes: the first word), as logs, the ledger and Splunk
    /// name a policy-file key. Computed per request for policy-file keys, so without an intermediate array.
    public var keyID: String {
        let hex = String(words.0, radix: 16)
        return "sha256:" + String(repeating: "0", count: 16 - hex.count) + hex
    }

    /// Every word is compared, whatever differs first.
    public static func == (lhs: SubkeyDigest, rhs: SubkeyDigest) -> Bool {
        ((lhs.words.0 ^ rhs.words.0) | (lhs.words.1 ^ rhs.words.1) | (lhs.words.2 ^ rhs.words.2) | (lhs.words.3 ^ rhs.words.3))
            == 0
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(words.0)
        hasher.combine(words.1)
        hasher.combine(words.2)
        hasher.combine(words.3)
    }
}
