/// The text of `quotas check` and `quotas explain`: what the policy means for each subkey, who is already at a
/// limit, and why one request would be admitted or refused. Subkeys are shown by position in the file and hashed
/// id, never in plaintext (the output may be pasted into a ticket).
public struct QuotaInspector: Sendable {
    public var policy: QuotaPolicy
    /// The policy's name in messages (a path or `QUOTAS_JSON`).
    public var source: String
    public var directory: KeyDirectory
    /// Counters from the ledger; `nil` without a database.
    public var snapshot: LedgerSnapshot?
    /// Every `usage.subkey` of the ledger (to find keys only the earlier bridge's tables know).
    public var ledgerKeys: [String]
    /// The keys registry (it wins over the policy for a key both know).
    public var registry = KeyRegistryContents()
    public var now: Double

    public init(
        policy: QuotaPolicy,
        source: String,
        directory: KeyDirectory = KeyDirectory(),
        snapshot: LedgerSnapshot? = nil,
        ledgerKeys: [String] = [],
        now: Double
    ) {
        self.policy = policy
        self.source = source
        self.directory = directory
        self.snapshot = snapshot
        self.ledgerKeys = ledgerKeys
        self.now = now
    }

    /// How a subject is named: position, hashed id, and the earlier bridge's name and email when known.
    func name(_ subject: PolicySubject) -> String {
        var text = "subkey entry #\(subject.ordinal) \(subject.keyID)"
        if let entry = directory.entries[subject.digest] {
            if let name = entry.friendlyName { text += " \(name)" }
            if let email = entry.email { text += " <\(email)>" }
        }
        return text
    }

    // MARK: check

    public func check() -> String {
        var out = ""
        var managed: [SubkeyDigest: KeyRecord] = [:]
        let records = Dictionary(registry.keys.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
        for secret in registry.secrets {
            if let digest = SubkeyDigest(hash: secret.hash), let record = records[secret.keyID] { managed[digest] = record }
        }
        let subjects = policy.orderedSubjects
        out += "\(source): valid; \(count(subjects.count, "subkey")), \(count(policy.templates.count, "template"))\n"
        for warning in policy.warnings { out += "warning: \(warning)\n" }
        for subject in subjects {
            out += "\n\(name(subject))"
            if let template = subject.template { out += "  template: \(template)" }
            if let managed = managed[subject.digest] {
                out +=
                    "  MANAGED: key \(managed.id) (\(managed.name), \(managed.status.rawValue)) in the registry, whose rules apply; "
                out += "remove this entry"
            } else if directory.entries[subject.digest]?.isRefused == true {
                out += "  REFUSED: key_lifecycle marks it \(directory.entries[subject.digest]?.status ?? "")"
            }
            out += "\n"
            if subject.rules.isEmpty {
                out += "  no rules: every model, no limits\n"
                continue
            }
            out += Self.rulesTable(subject.rules)
        }
        guard let snapshot else { return out }
        out += "\n" + overLimits(snapshot)
        return out
    }

    /// Effective rules, most specific first, with the layers each came from.
    static func rulesTable(_ rules: [PolicyRule], indent: String = "  ") -> String {
        var rows = [["pattern", "requests", "total_tokens", "period", "from"]]
        for entry in rules {
            rows.append([
                entry.pattern.text, describe(entry.rule.requests), describe(entry.rule.totalTokens),
                entry.rule.period?.rawValue ?? "-", entry.origins.map(\.description).joined(separator: ", "),
            ])
        }
        return TextTable.render(rows, rightAligned: [1, 2], indent: indent)
    }

    private static func describe(_ limit: QuotaLimit?) -> String {
        switch limit {
        case nil: "-"
        case .unlimited: "unlimited"
        case .limit(let value) where value <= 0: "blocked"
        case .limit(let value): String(value)
        }
    }

    /// Keys already at or over a limit (token limits were never enforced before this bridge), and keys the earlier
    /// bridge's tables know that this policy does not authorise.
    private func overLimits(_ snapshot: LedgerSnapshot) -> String {
        var out = ""
        var counters: [String: [String: (lifetime: Tally, daily: Tally, monthly: Tally)]] = [:]
        let managedIDs = Set(registry.keys.map(\.id))
        for row in snapshot.lifetime {
            let keyID = LedgerKeys.keyID(forLedgerKey: row.key, isManaged: managedIDs.contains)
            counters[keyID, default: [:]][row.model, default: (Tally(), Tally(), Tally())].lifetime.add(row.tally)
        }
        for row in snapshot.daily {
            counters[row.key, default: [:]][row.model, default: (Tally(), Tally(), Tally())].daily.add(row.tally)
        }
        for row in snapshot.monthly {
            counters[row.key, default: [:]][row.model, default: (Tally(), Tally(), Tally())].monthly.add(row.tally)
        }
        // Policy-file subjects the registry does not manage, then the registry's active keys, each with its rules.
        var checked: [(label: String, keyID: String, limits: (String) -> QuotaLimits)] = []
        let managedDigests = Set(registry.secrets.compactMap { SubkeyDigest(hash: $0.hash) })
        for subject in policy.orderedSubjects where !managedDigests.contains(subject.digest) {
            checked.append(("#\(subject.ordinal) \(subject.keyID)", subject.keyID, subject.limits(for:)))
        }
        for key in registry.keys where key.status == .active {
            let rules = policy.effectiveRules(template: key.template, own: key.enforcedRules)
            let templateMissing = key.template.map { policy.templates[$0] == nil } ?? false
            checked.append(
                (
                    "\(key.id) \(key.name)", key.id,
                    { model in
                        templateMissing
                            ? QuotaLimits.blocked : QuotaPolicy.limits(in: rules, for: model)
                    }
                )
            )
        }
        var rows = [["subkey", "model", "limit", "used", "period"]]
        for subject in checked {
            for (model, tallies) in (counters[subject.keyID] ?? [:]).sorted(by: { $0.key < $1.key }) {
                let limits = subject.limits(model)
                let used: Tally
                switch limits.period {
                case .lifetime: used = tallies.lifetime
                case .daily: used = tallies.daily
                case .monthly: used = tallies.monthly
                }
                let label = subject.label
                if limits.isBlocked {
                    rows.append([label, model, "blocked", "\(used.requests) requests", limits.period.rawValue])
                    continue
                }
                if let limit = limits.requests, used.requests >= limit {
                    rows.append([label, model, "\(limit) requests", "\(used.requests)", limits.period.rawValue])
                }
                if let limit = limits.totalTokens, used.totalTokens >= limit {
                    rows.append([label, model, "\(limit) tokens", "\(used.totalTokens)", limits.period.rawValue])
                }
            }
        }
        if rows.count == 1 {
            out += "No subkey is at or over a limit.\n"
        } else {
            out += "At or over a limit now (refused until the period ends, or for good with lifetime limits):\n"
            out += TextTable.render(rows, rightAligned: [3], indent: "  ")
        }
        let authorised = Set(policy.subjects.keys)
        let unnamed = directory.entries.filter { !authorised.contains($0.key) && !$0.value.isRefused }
        if !unnamed.isEmpty {
            out += "\n\(count(unnamed.count, "key")) in subkey_names or key_lifecycle but not in this policy: refused now "
            out += "(the earlier bridge accepted keys named in subkey_names). Add them to the policy, or import them "
            out += "into the key registry.\n"
        }
        let refused = policy.orderedSubjects.filter { directory.entries[$0.digest]?.isRefused == true }
        if !refused.isEmpty {
            out += "\n\(count(refused.count, "subkey")) in this policy that key_lifecycle marks revoked or replaced "
            out += "(refused): " + refused.map { "#\($0.ordinal) \($0.keyID)" }.joined(separator: ", ") + "\n"
        }
        let managed = Set(registry.keys.map(\.id))
        let unknown = Set(ledgerKeys.map { LedgerKeys.keyID(forLedgerKey: $0, isManaged: managed.contains) })
            .subtracting(policy.subjects.values.map(\.keyID)).subtracting(managed).subtracting([Caller.anonymousKey])
        if !unknown.isEmpty {
            out += "\n\(count(unknown.count, "key")) with usage in the ledger but not in this policy (refused if presented).\n"
        }
        return out
    }

    // MARK: explain

    /// Why a request of `subkey` for `model` would be admitted or refused now. `nil` when the policy does not name
    /// the subkey.
    public func explain(subkey: String, model: String) -> (text: String, authorised: Bool) {
        let digest = SubkeyDigest(subkey)
        if let secret = registry.secrets.first(where: { SubkeyDigest(hash: $0.hash) == digest }),
            let key = registry.keys.first(where: { $0.id == secret.keyID })
        {
            var out = "managed key \(key.id) \(key.name)\(key.email.map { " <\($0)>" } ?? "")\nmodel: \(model)\n"
            guard key.status == .active, secret.isValid(at: now) else {
                let why = key.status == .active ? "this secret was rotated away" : "the key is \(key.status.rawValue)"
                return (out + "refused (403 unauthorized_subkey): \(why)\n", false)
            }
            if let template = key.template, policy.templates[template] == nil {
                out += "refused (403 model_not_allowed): the policy does not define its template '\(template)'\n"
                return (out, true)
            }
            let rules = policy.effectiveRules(template: key.template, own: key.enforcedRules)
            return (out + explain(rules: rules, keyID: key.id, model: model), true)
        }
        guard let subject = policy.subject(for: subkey) else {
            return ("\(digest.keyID): not in \(source) nor the keys registry: refused (403 unauthorized_subkey)\n", false)
        }
        let out = "\(name(subject))\nmodel: \(model)\n"
        if let state = directory.entries[subject.digest], state.isRefused {
            return (out + "refused (403 unauthorized_subkey): key_lifecycle marks it \(state.status ?? "")\n", false)
        }
        return (out + explain(rules: subject.rules, keyID: subject.keyID, model: model), true)
    }

    /// The rules that decide a request of `model`, what they leave, and the verdict.
    private func explain(rules: [PolicyRule], keyID: String, model: String) -> String {
        var out = ""
        let matching = rules.filter { $0.pattern.matches(model) }
        if matching.isEmpty {
            out += "no rule matches: no limits\n"
        } else {
            out += "rules that match, most specific first:\n"
            var rows: [[String]] = []
            for entry in matching {
                var fields: [String] = []
                if let requests = entry.rule.requests { fields.append("requests=\(Self.describe(requests))") }
                if let tokens = entry.rule.totalTokens { fields.append("total_tokens=\(Self.describe(tokens))") }
                if let period = entry.rule.period { fields.append("period=\(period.rawValue)") }
                rows.append([
                    entry.pattern.text, fields.isEmpty ? "(no limit fields)" : fields.joined(separator: " "),
                    entry.origins.map(\.description).joined(separator: ", "),
                ])
            }
            out += TextTable.render(rows, rightAligned: [], indent: "  ")
        }
        let limits = QuotaPolicy.limits(in: rules, for: model)
        out += "in force: requests \(limits.requests.map(String.init) ?? "unlimited")"
        out += ", total_tokens \(limits.totalTokens.map(String.init) ?? "unlimited"), period \(limits.period.rawValue)\n"
        if limits.isBlocked {
            out += "refused (403 model_not_allowed): a limit of 0 or below blocks the model\n"
            return out
        }
        let today = PeriodCalendar.day(now)
        let used = usage(of: keyID, model: model, period: limits.period, today: today)
        let span: String
        switch limits.period {
        case .lifetime: span = "in total"
        case .daily: span = "today (\(PeriodCalendar.dayString(today)))"
        case .monthly: span = "this month (\(PeriodCalendar.monthString(PeriodCalendar.month(ofDay: today))))"
        }
        if snapshot == nil { out += "no database: usage counted as 0\n" }
        out += "used \(span): \(used.requests) requests, \(used.totalTokens) tokens\n"
        let requestsLeft = limits.requests.map { max(0, $0 - used.requests) }
        let tokensLeft = limits.totalTokens.map { max(0, $0 - used.totalTokens) }
        out += "left: \(requestsLeft.map { "\($0) requests" } ?? "unlimited requests")"
        out += ", \(tokensLeft.map { "\($0) tokens" } ?? "unlimited tokens")"
        if let end = PeriodCalendar.end(of: limits.period, at: now) {
            out += "; starts again at \(PeriodCalendar.timestamp(end).prefix(19))Z"
        }
        out += "\n"
        if requestsLeft == 0 || tokensLeft == 0 {
            out += "refused now (429 quota_exceeded, \(requestsLeft == 0 ? "requests" : "tokens"))\n"
        } else {
            out += "admitted now\n"
        }
        return out
    }

    private func usage(of keyID: String, model: String, period: QuotaPeriod, today: Int) -> Tally {
        guard let snapshot else { return Tally() }
        var tally = Tally()
        switch period {
        case .lifetime:
            for row in snapshot.lifetime
            where row.model == model && (row.key == keyID || LedgerKeys.keyID(forLedgerKey: row.key) == keyID) {
                tally.add(row.tally)
            }
        case .daily:
            for row in snapshot.daily where row.model == model && row.key == keyID { tally.add(row.tally) }
        case .monthly:
            for row in snapshot.monthly where row.model == model && row.key == keyID { tally.add(row.tally) }
        }
        return tally
    }

    private func count(_ number: Int, _ noun: String) -> String {
        "\(number) \(noun)\(number == 1 ? "" : "s")"
    }
}

/// Aligned plain-text columns, two spaces apart.
enum TextTable {
    static func render(_ rows: [[String]], rightAligned: Set<Int>, indent: String = "") -> String {
        var widths: [Int] = []
        for row in rows {
            for (column, cell) in row.enumerated() {
                if column >= widths.count { widths.append(0) }
                widths[column] = max(widths[column], cell.count)
            }
        }
        var out = ""
        for row in rows {
            var line = indent
            for (column, cell) in row.enumerated() {
                let padding = String(repeating: " ", count: widths[column] - cell.count)
                if column > 0 { line += "  " }
                line += rightAligned.contains(column) ? padding + cell : cell + padding
            }
            while line.last == " " { line.removeLast() }
            out += line + "\n"
        }
        return out
    }
}
