/// Counts of one (key, model) over some span.
public struct Tally: Sendable, Equatable {
    public var requests: Int64 = 0
    public var promptTokens: Int64 = 0
    public var completionTokens: Int64 = 0
    public var totalTokens: Int64 = 0

    public init(requests: Int64 = 0, promptTokens: Int64 = 0, completionTokens: Int64 = 0, totalTokens: Int64 = 0) {
        self.requests = requests
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.totalTokens = totalTokens
    }

    // Sums saturate: a ledger holding absurd counts (hostile usage figures, an old file) must never trap.
    mutating func add(_ usage: Usage) {
        Self.add(Int64(usage.promptTokens), to: &promptTokens)
        Self.add(Int64(usage.completionTokens), to: &completionTokens)
        Self.add(Int64(usage.totalTokens), to: &totalTokens)
    }

    mutating func add(_ other: Tally) {
        Self.add(other.requests, to: &requests)
        Self.add(other.promptTokens, to: &promptTokens)
        Self.add(other.completionTokens, to: &completionTokens)
        Self.add(other.totalTokens, to: &totalTokens)
    }

    private static func add(_ value: Int64, to total: inout Int64) {
        let (sum, overflow) = total.addingReportingOverflow(value)
        total = overflow ? (value > 0 ? .max : .min) : sum
    }

    var isZero: Bool { self == Tally() }
}

/// One answered request, as the ledger keeps it: lifetime and period counters, and a row of the request log with
/// everything its Splunk usage event needs (never a plaintext key outside `ledgerKey`).
public struct LedgerEntry: Sendable {
    /// The `usage` table's `subkey` (see `Caller.ledgerKey`).
    public var ledgerKey: String
    public var keyID: String
    /// `sha256:<16 hex>` of the presented subkey, or `anonymous`.
    public var subkeyHash: String
    public var friendlyName: String?
    public var email: String?
    public var model: String
    public var usage: Usage
    /// The UTC day and month the request was admitted in (`YYYY-MM-DD`, `YYYY-MM`): its period rows.
    public var day: String
    public var month: String
    public var finishedAt: Double
    public var requestID: String
    public var statusCode: Int
    public var isStreaming: Bool
    public var latencySeconds: Double
    public var clientDisconnected: Bool
    public var clientAddress: String
    public var forwardedFor: String
    /// Whether Splunk gets this request's usage event. It is not stored as an event: the shipper rebuilds it from
    /// the request-log row (`LedgerWriter` sets this when delivery is on and the spool has a place for it).
    public var hasUsageEvent = false

    public init(_ record: UsageRecord) {
        let caller = record.caller
        let day = PeriodCalendar.day(record.admission.admittedAt)
        self.ledgerKey = caller.ledgerKey
        self.keyID = caller.keyID
        self.subkeyHash = caller.subkeyHash
        self.friendlyName = caller.friendlyName
        self.email = caller.email
        self.model = record.model
        self.usage = record.usage
        self.day = PeriodCalendar.dayString(day)
        self.month = PeriodCalendar.monthString(PeriodCalendar.month(ofDay: day))
        self.finishedAt = record.finishedAt
        self.requestID = record.requestID
        self.statusCode = record.statusCode
        self.isStreaming = record.isStreaming
        let (seconds, attoseconds) = record.latency.components
        self.latencySeconds = Double(seconds) + Double(attoseconds) / 1e18
        self.clientDisconnected = record.clientDisconnected
        self.clientAddress = record.clientAddress
        self.forwardedFor = record.forwardedFor
    }
}

/// What the bridge loads at start: the counters quotas are enforced against.
public struct LedgerSnapshot: Sendable {
    public struct Row: Sendable {
        /// `usage.subkey` for lifetime rows; the key id for period rows.
        public var key: String
        public var model: String
        public var tally: Tally
    }

    public var lifetime: [Row] = []
    /// Rows of the day and month asked for.
    public var daily: [Row] = []
    public var monthly: [Row] = []

    public init() {}
}

/// Names and states the earlier bridge kept per subkey (`subkey_names`, `key_lifecycle`), by digest.
public struct KeyDirectory: Sendable {
    public struct Entry: Sendable, Equatable {
        public var friendlyName: String?
        public var email: String?
        /// `key_lifecycle.status`: `active`, `revoked`, `replaced`; `nil` when the table has no row.
        public var status: String?

        /// Any recorded state other than `active` refuses the key, as the earlier bridge did.
        public var isRefused: Bool { status.map { $0.lowercased() != "active" } ?? false }
    }

    public var entries: [SubkeyDigest: Entry] = [:]

    public init(entries: [SubkeyDigest: Entry] = [:]) { self.entries = entries }
}

/// The durable side of the ledger, and the Splunk events committed with it (error events in an outbox, usage events
/// as request-log rows marked for Splunk). SQLite (`SQLiteLedger`) implements
/// it; a PostgreSQL store will too. Every method but `commitAtOnce` may be slow: the request path only reaches it
/// through `LedgerWriter`'s group commit.
public protocol LedgerStore: SplunkOutbox {
    /// Where it lives, for `/health` and messages (a path; never a password).
    var location: String { get }
    /// Lifetime totals, and the period rows of `day` (`YYYY-MM-DD`) and `month` (`YYYY-MM`).
    func snapshot(day: String, month: String) async throws -> LedgerSnapshot
    /// The earlier bridge's names and key states, when its tables exist.
    func directory() async throws -> KeyDirectory
    /// Writes `entries` (with the usage events of those that have one) and queues `events` for Splunk in one
    /// transaction and, when `cutoff` is set, removes up to `purgeLimit` request-log rows older than it (never one
    /// whose usage event Splunk has yet to get). Returns how many it removed.
    func commit(
        _ entries: [LedgerEntry],
        events: [OutboxEvent],
        purgingLogBefore cutoff: Double?,
        purgeLimit: Int
    ) async throws -> Int
    /// Writes `entries` and queues `events` as `commit` does, without a purge, on the calling thread, without
    /// waiting: when another connection holds the write lock it writes nothing and returns `false` (the caller then
    /// uses `commit`, which waits its turn). Only `LedgerWriter` calls it, for a request alone on its event loop.
    func commitAtOnce(_ entries: [LedgerEntry], events: [OutboxEvent]) throws -> Bool
    /// Totals for `usage report`.
    func report(_ query: UsageQuery) async throws -> [UsageReportRow]
    func close() async throws
}

extension LedgerStore {
    /// A store that cannot write without waiting never does: its commits all go through `commit`.
    public func commitAtOnce(_ entries: [LedgerEntry], events: [OutboxEvent]) throws -> Bool { false }
}

/// The rows `usage report` asks for.
public struct UsageQuery: Sendable {
    public enum Grouping: String, Sendable, CaseIterable {
        case subkey
        case model
        case day
        case month
    }

    /// Inclusive days (`since`, `until`); with either, the daily rows are read.
    public var since: Int?
    public var until: Int?
    /// Key ids to keep (already resolved from a subkey, id or name); `nil` keeps all.
    public var keyIDs: Set<String>?
    public var model: String?
    public var grouping: Grouping

    public init(since: Int? = nil, until: Int? = nil, keyIDs: Set<String>? = nil, model: String? = nil, grouping: Grouping) {
        self.since = since
        self.until = until
        self.keyIDs = keyIDs
        self.model = model
        self.grouping = grouping
    }
}

/// One row of a usage report, before it is grouped.
public struct UsageReportRow: Sendable, Equatable {
    public var keyID: String
    public var model: String
    /// `YYYY-MM-DD` or `YYYY-MM`; `nil` for lifetime rows.
    public var period: String?
    public var tally: Tally

    public init(keyID: String, model: String, period: String?, tally: Tally) {
        self.keyID = keyID
        self.model = model
        self.period = period
        self.tally = tally
    }
}

/// How a `usage.subkey` value maps to a key id: `anonymous` and a managed key's id stay, a policy-file key is
/// hashed.
public enum LedgerKeys {
    /// `isManaged` tells a managed key's id (its `usage.subkey` already) from a policy-file key.
    public static func keyID(forLedgerKey key: String, isManaged: (String) -> Bool = { _ in false }) -> String {
        key == Caller.anonymousKey || isManaged(key) ? key : SubkeyDigest(key).keyID
    }
}
