import Synchronization

/// Subkey authorisation and quota enforcement (contract 4.2 step 1, 5.1, 5.2), entirely in memory: the policy,
/// the earlier bridge's key states, and a counter per (key, model) holding lifetime, today's and this month's
/// tallies. The ledger loads the counters at start and the recorder keeps them in step with every answer.
///
/// One lock guards it all, so a reservation is atomic: N concurrent requests against a remaining allowance of K
/// admit exactly K. Nothing here blocks or awaits.
public final class QuotaEnforcer: SubkeyAuthorizer, AdmissionPolicy {
    struct CounterKey: Hashable {
        var keyID: String
        var model: String
    }

    struct Counter {
        var lifetime = Tally()
        var day: Int
        var daily = Tally()
        var month: Int
        var monthly = Tally()
        /// The resolved limits, valid while the policy's and the registry's generations are these.
        var limits: QuotaLimits?
        var generation = Generation(policy: -1, registry: -1)

        init(day: Int, month: Int) {
            self.day = day
            self.month = month
        }

        /// Starts the daily and monthly tallies again when their period has passed.
        mutating func roll(day: Int, month: Int) {
            if day != self.day {
                self.day = day
                daily = Tally()
            }
            if month != self.month {
                self.month = month
                monthly = Tally()
            }
        }

        func tally(_ period: QuotaPeriod) -> Tally {
            switch period {
            case .lifetime: lifetime
            case .daily: daily
            case .monthly: monthly
            }
        }

        var isEmpty: Bool { lifetime.isZero && daily.isZero && monthly.isZero }
    }

    struct Generation: Equatable {
        var policy: Int
        var registry: Int
    }

    struct State {
        var policy: QuotaPolicy
        var generation = 0
        var directory = KeyDirectory()
        var counters: [CounterKey: Counter] = [:]
    }

    private let state: Mutex<State>
    private let registry: (any KeyRegistry)?
    private let clock: BridgeClock

    /// `registry`: managed keys, consulted before the policy file (it wins for a key both know).
    public init(
        policy: QuotaPolicy,
        directory: KeyDirectory = KeyDirectory(),
        registry: (any KeyRegistry)? = nil,
        clock: BridgeClock
    ) {
        self.state = Mutex(State(policy: policy, directory: directory))
        self.registry = registry
        self.clock = clock
    }

    public var policy: QuotaPolicy { state.withLock { $0.policy } }

    /// Swaps the policy in at once; requests admitted from now on see only the new one.
    public func replace(policy: QuotaPolicy) {
        state.withLock { state in
            state.policy = policy
            state.generation += 1
        }
    }

    public func replace(directory: KeyDirectory) {
        state.withLock { $0.directory = directory }
    }

    /// Sets the counters from the ledger (at start, before any request).
    public func load(_ snapshot: LedgerSnapshot) {
        let now = clock.now()
        let day = PeriodCalendar.day(now)
        let month = PeriodCalendar.month(ofDay: day)
        state.withLock { state in
            for row in snapshot.lifetime {
                let keyID = LedgerKeys.keyID(forLedgerKey: row.key) { registry?.contains(keyID: $0) ?? false }
                let key = CounterKey(keyID: keyID, model: row.model)
                // Several `usage.subkey` values never map to one id, but adding keeps this total if one day they do.
                state.counters[key, default: Counter(day: day, month: month)].lifetime.add(row.tally)
            }
            for row in snapshot.daily {
                state.counters[CounterKey(keyID: row.key, model: row.model), default: Counter(day: day, month: month)]
                    .daily.add(row.tally)
            }
            for row in snapshot.monthly {
                state.counters[CounterKey(keyID: row.key, model: row.model), default: Counter(day: day, month: month)]
                    .monthly.add(row.tally)
            }
        }
    }

    // MARK: SubkeyAuthorizer

    public func authorize(subkey: String?) async throws(BridgeError) -> Caller {
        if subkey != nil, let registry { await registry.refreshIfChanged() }
        return try authorizeNow(subkey: subkey)
    }

    func authorizeNow(subkey: String?) throws(BridgeError) -> Caller {
        guard let subkey else { return .anonymous }
        let digest = SubkeyDigest(subkey)
        if let managed = registry?.key(for: digest) {
            guard managed.isActive else { throw .unauthorizedSubkey }
            return Caller(
                subkey: subkey,
                digest: digest,
                keyID: managed.keyID,
                ledgerKey: managed.keyID,
                friendlyName: managed.friendlyName,
                email: managed.email
            )
        }
        return try state.withLock { (state) throws(BridgeError) -> Caller in
            guard state.policy.subjects[digest] != nil else { throw .unauthorizedSubkey }
            let entry = state.directory.entries[digest]
            if entry?.isRefused == true { throw .unauthorizedSubkey }
            return Caller(
                subkey: subkey,
                digest: digest,
                ledgerKey: subkey,
                friendlyName: entry?.friendlyName,
                email: entry?.email
            )
        }
    }

    /// The limits of the key with `digest` for `model`: a managed key's (global rules, its template, its own), else
    /// the policy file's. Throws when neither knows the key any more (a reload or a revocation since it was
    /// authorised).
    private func resolveLimits(_ digest: SubkeyDigest, model: String, in state: State) throws(BridgeError) -> QuotaLimits {
        if let managed = registry?.key(for: digest) {
            guard managed.isActive else { throw .unauthorizedSubkey }
            // A template the policy no longer defines refuses every model: its limits are unknown, and falling back
            // to no limits would be the costly mistake. (The reloader logs which keys this hits.)
            if let template = managed.template, state.policy.templates[template] == nil {
                return .blocked
            }
            let rules = state.policy.effectiveRules(template: managed.template, own: managed.rules)
            return QuotaPolicy.limits(in: rules, for: model)
        }
        guard let subject = state.policy.subjects[digest] else { throw .unauthorizedSubkey }
        return subject.limits(for: model)
    }

    // MARK: AdmissionPolicy

    public func admit(_ caller: Caller, model: String) async throws(BridgeError) -> Admission {
        try admitNow(caller, model: model)
    }

    func admitNow(_ caller: Caller, model: String) throws(BridgeError) -> Admission {
        let now = clock.now()
        let day = PeriodCalendar.day(now)
        let month = PeriodCalendar.month(ofDay: day)
        let key = CounterKey(keyID: caller.keyID, model: model)
        try state.withLock { (state) throws(BridgeError) in
            let existing = state.counters[key]
            var counter = existing ?? Counter(day: day, month: month)
            counter.roll(day: day, month: month)
            if let digest = caller.digest {
                let limits: QuotaLimits
                let generation = Generation(policy: state.generation, registry: registry?.generation ?? 0)
                if counter.generation == generation, let cached = counter.limits {
                    limits = cached
                } else {
                    limits = try resolveLimits(digest, model: model, in: state)
                    counter.limits = limits
                    counter.generation = generation
                }
                if limits.isBlocked {
                    // A refused request leaves no new counter behind, so hostile model names cannot grow the table.
                    if existing != nil { state.counters[key] = counter }
                    throw .modelNotAllowed(model)
                }
                let used = counter.tally(limits.period)
                let requestsUsedUp = limits.requests.map { used.requests >= $0 } ?? false
                let tokensUsedUp = limits.totalTokens.map { used.totalTokens >= $0 } ?? false
                if requestsUsedUp || tokensUsedUp {
                    if existing != nil { state.counters[key] = counter }
                    throw .quotaExceeded(
                        requestsUsedUp ? "requests" : "tokens",
                        retryAfter: Self.retryAfter(limits.period, now: now)
                    )
                }
            }
            counter.lifetime.requests += 1
            counter.daily.requests += 1
            counter.monthly.requests += 1
            state.counters[key] = counter
        }
        return Admission(caller: caller, model: model, admittedAt: now)
    }

    /// The caller a request now belongs to: a policy-file caller whose subkey was imported into the registry while
    /// the request ran becomes the managed key, so its usage is charged and written under the key's id.
    public func current(_ caller: Caller) -> Caller {
        guard let digest = caller.digest, caller.ledgerKey == caller.subkey, let managed = registry?.key(for: digest)
        else { return caller }
        return Caller(
            subkey: caller.subkey,
            digest: digest,
            keyID: managed.keyID,
            ledgerKey: managed.keyID,
            friendlyName: managed.friendlyName,
            email: managed.email
        )
    }

    /// Moves the counters of keys imported into the registry from their old hashed ids to their ids, so an import
    /// while the bridge runs neither forgets their usage nor lets them start again from zero.
    public func adopt(aliases: [String: String]) {
        guard !aliases.isEmpty else { return }
        let day = PeriodCalendar.day(clock.now())
        let month = PeriodCalendar.month(ofDay: day)
        state.withLock { state in
            for (key, var counter) in state.counters {
                guard let keyID = aliases[key.keyID] else { continue }
                state.counters[key] = nil
                let target = CounterKey(keyID: keyID, model: key.model)
                var merged = state.counters[target] ?? Counter(day: day, month: month)
                merged.roll(day: day, month: month)
                counter.roll(day: day, month: month)
                merged.lifetime.add(counter.lifetime)
                merged.daily.add(counter.daily)
                merged.monthly.add(counter.monthly)
                merged.limits = nil
                state.counters[target] = merged
            }
        }
    }

    /// Whole seconds until a periodic limit starts again (at least 1); `nil` for lifetime limits.
    static func retryAfter(_ period: QuotaPeriod, now: Double) -> Int? {
        guard let end = PeriodCalendar.end(of: period, at: now) else { return nil }
        return max(1, Int((end - now).rounded(.up)))
    }

    public func release(_ admission: Admission) async {
        let day = PeriodCalendar.day(admission.admittedAt)
        let month = PeriodCalendar.month(ofDay: day)
        // Imported into the registry meanwhile: the reservation moved to the key's id with its counter.
        let key = CounterKey(keyID: current(admission.caller).keyID, model: admission.model)
        state.withLock { state in
            guard var counter = state.counters[key] else { return }
            counter.lifetime.requests -= 1
            if counter.day == day { counter.daily.requests -= 1 }
            if counter.month == month { counter.monthly.requests -= 1 }
            state.counters[key] = counter.isEmpty ? nil : counter
        }
    }

    public func allows(_ caller: Caller, model: String) async -> Bool {
        guard let digest = caller.digest else { return true }
        return state.withLock { state in
            guard let limits = try? resolveLimits(digest, model: model, in: state) else { return false }
            return !limits.isBlocked
        }
    }

    /// Charges an answered request's tokens to the day and month it was admitted in (its request was counted at
    /// admission).
    public func charge(_ admission: Admission, usage: Usage) {
        let day = PeriodCalendar.day(admission.admittedAt)
        let month = PeriodCalendar.month(ofDay: day)
        let key = CounterKey(keyID: admission.caller.keyID, model: admission.model)
        state.withLock { state in
            var counter = state.counters[key] ?? Counter(day: day, month: month)
            counter.lifetime.add(usage)
            if counter.day == day { counter.daily.add(usage) }
            if counter.month == month { counter.monthly.add(usage) }
            state.counters[key] = counter
        }
    }

    /// The counter of a key and model as of now (for `/health`-style views and tests).
    public func tally(keyID: String, model: String, period: QuotaPeriod) -> Tally {
        let day = PeriodCalendar.day(clock.now())
        let month = PeriodCalendar.month(ofDay: day)
        return state.withLock { state in
            guard var counter = state.counters[CounterKey(keyID: keyID, model: model)] else { return Tally() }
            counter.roll(day: day, month: month)
            return counter.tally(period)
        }
    }

    public var subjectCount: Int { state.withLock { $0.policy.subjects.count } }
}

/// A key managed by the `keys` commands, found by the digest of its secret.
public struct ManagedKey: Sendable {
    /// Its non-secret id: what logs, the ledger (`usage.subkey` included) and Splunk call it.
    public var keyID: String
    public var friendlyName: String?
    public var email: String?
    /// A template of the policy file's `_templates`.
    public var template: String?
    public var rules: [(pattern: ModelPattern, rule: QuotaRule)]
    /// `false` once revoked (or past its rotation grace): refused as an unknown key would be.
    public var isActive: Bool

    public init(
        keyID: String,
        friendlyName: String? = nil,
        email: String? = nil,
        template: String? = nil,
        rules: [(pattern: ModelPattern, rule: QuotaRule)] = [],
        isActive: Bool = true
    ) {
        self.keyID = keyID
        self.friendlyName = friendlyName
        self.email = email
        self.template = template
        self.rules = rules
        self.isActive = isActive
    }
}

/// The keys registry: managed keys, which win over the policy file for a key both know. Lookups happen under the
/// enforcer's lock on every request, so they must be in memory and never block.
public protocol KeyRegistry: Sendable {
    func key(for digest: SubkeyDigest) -> ManagedKey?
    /// Whether `keyID` is a managed key's id (the ledger's `usage.subkey` for it).
    func contains(keyID: String) -> Bool
    /// Changes whenever a key's rules or state change, so the enforcer knows its cached limits are stale.
    var generation: Int { get }
    /// Called before each authorisation: brings the registry up to date when it changed (cheap when it did not).
    func refreshIfChanged() async
}

extension KeyRegistry {
    public func refreshIfChanged() async {}
}
