import Foundation
import GRDB
import GRDBSQLite
import Synchronization

/// The ledger in SQLite (`QUOTA_DB_PATH`), through GRDB: WAL with `synchronous=NORMAL`, so a commit is durable
/// against a killed process and costs no fsync per transaction.
///
/// Tables: `usage` exactly as the earlier bridge wrote it (lifetime totals; its files are used in place);
/// `usage_period` (daily and monthly totals per key id); `request_log` (one row per answered request, kept
/// `USAGE_LOG_RETENTION_DAYS`); `managed_key`, `managed_key_secret` and `managed_key_history` (the keys registry, see
/// `KeyTables`); `splunk_outbox` (error events, until Splunk has them), `splunk_log_cursor` (how far Splunk has the
/// usage events of request-log rows marked `splunk_event`, rebuilt from the rows when sent) and `splunk_dead_letter`
/// (events Splunk refused as malformed, with its answer). The earlier
/// bridge's `monthly_usage`, `subkey_names` and `key_lifecycle` are read, never written. Outside `usage` a
/// policy-file key appears only hashed.
public final class SQLiteLedger: LedgerStore {
    public let location: String
    let database: DatabaseQueue
    /// A second connection that copies the WAL back into the database file, so that work (and its fsync) never
    /// runs inside a request's commit, as SQLite's automatic checkpoint would.
    private let checkpointer: DatabaseQueue?
    /// A third connection for the Splunk shipper's reads, so that reading a few thousand pending events never holds
    /// up a request's commit on the writer's queue (WAL lets it read beside the writer).
    let outboxReader: DatabaseQueue?
    /// The next id of an outbox event or a request-log row, one sequence for both, so the shipper reads them as one
    /// queue in commit order: above every id in both tables (and the log cursor) at open, never handed out twice.
    private let nextEventID: Mutex<Int64>
    private let checkpointState = Mutex((commits: 0, running: false))
    /// Work on the writer's queue other than the group commit's (reads, the shipper's acknowledgements, a checkpoint
    /// between commits), queued or running: a commit at once would wait behind it on its event loop, so while there
    /// is any, it goes to the queue instead.
    private let otherWork = Atomic(0)
    /// Commits between checkpoints: a few pages each, so the WAL stays around a thousand pages, SQLite's default.
    static let commitsPerCheckpoint = 200

    /// WAL frames past which a checkpoint runs between two commits (`maximumWALFrames`; tests change it).
    private let walFrameLimit: Int

    private init(
        location: String,
        database: DatabaseQueue,
        checkpointer: DatabaseQueue? = nil,
        outboxReader: DatabaseQueue? = nil,
        nextEventID: Int64 = 1,
        walFrameLimit: Int
    ) {
        self.nextEventID = Mutex(nextEventID)
        self.location = location
        self.database = database
        self.checkpointer = checkpointer
        self.outboxReader = outboxReader
        self.walFrameLimit = walFrameLimit
    }

    /// How long a connection waits for another process's lock (a report, a key command) before it fails: long
    /// enough for one to finish its write, short enough that an answer is not held long while it does.
    static let busyTimeout = 2.0

    /// Opens (creating if needed) and migrates the database. `readOnly` opens an existing file for reports
    /// without changing it.
    public static func open(path: String, readOnly: Bool = false) throws -> SQLiteLedger {
        try open(path: path, readOnly: readOnly, walFrameLimit: maximumWALFrames)
    }

    static func open(path: String, readOnly: Bool, walFrameLimit: Int) throws -> SQLiteLedger {
        var configuration = Configuration()
        configuration.label = "ledger"
        configuration.busyMode = .timeout(busyTimeout)
        // The earlier bridge declared foreign keys in key_lifecycle but never enforced them; its files may hold
        // dangling references, which must not stop this bridge (ours declare none).
        configuration.foreignKeysEnabled = false
        if readOnly {
            configuration.readonly = true
            let database = try DatabaseQueue(path: path, configuration: configuration)
            return SQLiteLedger(location: path, database: database, walFrameLimit: walFrameLimit)
        }
        configuration.journalMode = .wal
        configuration.prepareDatabase { db in
            // The WAL file is cut back to this size when it starts again (it would otherwise keep its largest size).
            try db.execute(
                sql: "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 33554432"
            )
        }
        let database = try DatabaseQueue(path: path, configuration: configuration)
        try migrator.disablingDeferredForeignKeyChecks().migrate(database)
        configuration.label = "ledger-checkpoint"
        let checkpointer = try DatabaseQueue(path: path, configuration: configuration)
        configuration.label = "ledger-outbox"
        configuration.readonly = true
        let outboxReader = try DatabaseQueue(path: path, configuration: configuration)
        let lastEventID = try database.read { db in
            try Int64.fetchOne(
                db,
                sql: """
                    SELECT max(coalesce((SELECT max(id) FROM splunk_outbox), 0),
                      coalesce((SELECT max(id) FROM request_log), 0),
                      coalesce((SELECT shipped_through FROM splunk_log_cursor), 0))
                    """
            ) ?? 0
        }
        return SQLiteLedger(
            location: path,
            database: database,
            checkpointer: checkpointer,
            outboxReader: outboxReader,
            nextEventID: lastEventID + 1,
            walFrameLimit: walFrameLimit
        )
    }

    /// Versioned migrations; each runs once per file, recorded in `grdb_migrations`.
    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("1 usage, periods and request log") { db in
            try db.execute(
                sql: """
                    CREATE TABLE IF NOT EXISTS usage (subkey TEXT NOT NULL, model TEXT NOT NULL,
                      requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
                      completion_tokens INTEGER NOT NULL DEFAULT 0, total_tokens INTEGER NOT NULL DEFAULT 0,
                      PRIMARY KEY (subkey, model));
                    CREATE TABLE usage_period (
                      key_id TEXT NOT NULL, model TEXT NOT NULL,
                      period TEXT NOT NULL CHECK (period IN ('daily', 'monthly')),
                      period_start TEXT NOT NULL,
                      requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
                      completion_tokens INTEGER NOT NULL DEFAULT 0, total_tokens INTEGER NOT NULL DEFAULT 0,
                      PRIMARY KEY (period, period_start, key_id, model)) WITHOUT ROWID;
                    CREATE TABLE request_log (
                      id INTEGER PRIMARY KEY,
                      finished_at REAL NOT NULL, request_id TEXT NOT NULL,
                      key_id TEXT NOT NULL, subkey_hash TEXT NOT NULL, friendly_name TEXT, email TEXT,
                      model TEXT NOT NULL, status_code INTEGER NOT NULL,
                      prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, total_tokens INTEGER NOT NULL,
                      is_streaming INTEGER NOT NULL, latency_ms REAL NOT NULL, client_disconnected INTEGER NOT NULL,
                      client_ip TEXT NOT NULL, x_forwarded_for TEXT NOT NULL);
                    CREATE INDEX request_log_finished_at ON request_log (finished_at);
                    """
            )
            // The earlier bridge's monthly totals carry on as this bridge's monthly counters, under hashed keys.
            if try db.tableExists("monthly_usage") {
                let rows = try Row.fetchAll(
                    db,
                    sql: """
                        SELECT subkey, model, usage_month, requests, prompt_tokens, completion_tokens, total_tokens
                        FROM monthly_usage
                        """
                )
                for row in rows {
                    guard let subkey: String = row["subkey"], let model: String = row["model"],
                        let month: String = row["usage_month"]
                    else { continue }
                    try db.execute(
                        sql: """
                            INSERT INTO usage_period (key_id, model, period, period_start, requests, prompt_tokens,
                              completion_tokens, total_tokens) VALUES (?, ?, 'monthly', ?, ?, ?, ?, ?)
                            ON CONFLICT (period, period_start, key_id, model) DO UPDATE SET \(addition)
                            """,
                        arguments: [
                            LedgerKeys.keyID(forLedgerKey: subkey), model, month, count(row, "requests"),
                            count(row, "prompt_tokens"), count(row, "completion_tokens"), count(row, "total_tokens"),
                        ]
                    )
                }
            }
        }
        migrator.registerMigration("2 splunk outbox") { db in
            // Ids are given by the writer (`nextOutboxID`), never by SQLite: a rowid would start again below the
            // shipper's cursor once every row is delivered and deleted, and AUTOINCREMENT costs a page write a commit.
            try db.execute(
                sql: """
                    CREATE TABLE splunk_outbox (
                      id INTEGER PRIMARY KEY,
                      kind TEXT NOT NULL CHECK (kind IN ('usage', 'error')),
                      time REAL NOT NULL,
                      event BLOB NOT NULL);
                    CREATE TABLE splunk_dead_letter (
                      id INTEGER PRIMARY KEY, outbox_id INTEGER NOT NULL,
                      kind TEXT NOT NULL, time REAL NOT NULL, event BLOB NOT NULL,
                      set_aside_at REAL NOT NULL, answer TEXT NOT NULL);
                    """
            )
        }
        migrator.registerMigration("3 keys registry") { db in
            try KeyTables.create(db)
        }
        migrator.registerMigration("4 usage events from the request log") { db in
            // A usage event is no longer a row of its own: the shipper rebuilds it from the request-log row, which
            // holds everything it says. Rows written before have theirs in the outbox already (0: not sent again).
            try db.execute(
                sql: """
                    ALTER TABLE request_log ADD COLUMN splunk_event INTEGER NOT NULL DEFAULT 0;
                    CREATE TABLE splunk_log_cursor (
                      id INTEGER PRIMARY KEY CHECK (id = 1),
                      shipped_through INTEGER NOT NULL);
                    INSERT INTO splunk_log_cursor (id, shipped_through)
                      SELECT 1, coalesce(max(id), 0) FROM request_log;
                    """
            )
        }
        migrator.registerMigration("5 request log without the finished_at index") { db in
            // One page less written by every commit. Rows are in the order requests finished, so a time is found by
            // bisecting ids instead (`firstLogID`).
            try db.execute(sql: "DROP INDEX IF EXISTS request_log_finished_at")
        }
        return migrator
    }

    public func snapshot(day: String, month: String) async throws -> LedgerSnapshot {
        try await read { db in
            var snapshot = LedgerSnapshot()
            guard try db.tableExists("usage") else { return snapshot }
            for row in try Row.fetchAll(
                db,
                sql: "SELECT subkey, model, requests, prompt_tokens, completion_tokens, total_tokens FROM usage"
            ) {
                snapshot.lifetime.append(.init(key: row["subkey"], model: row["model"], tally: Self.tally(row)))
            }
            guard try db.tableExists("usage_period") else {
                // A file of the earlier bridge not yet migrated (read by `quotas check --db` before an upgrade).
                if try db.tableExists("monthly_usage") {
                    for row in try Row.fetchAll(db, sql: Self.earlierMonthlySQL, arguments: [month]) {
                        let key = LedgerKeys.keyID(forLedgerKey: row["subkey"])
                        snapshot.monthly.append(.init(key: key, model: row["model"], tally: Self.tally(row)))
                    }
                }
                return snapshot
            }
            let sql = """
                SELECT key_id, model, requests, prompt_tokens, completion_tokens, total_tokens
                FROM usage_period WHERE period = ? AND period_start = ?
                """
            for row in try Row.fetchAll(db, sql: sql, arguments: ["daily", day]) {
                snapshot.daily.append(.init(key: row["key_id"], model: row["model"], tally: Self.tally(row)))
            }
            for row in try Row.fetchAll(db, sql: sql, arguments: ["monthly", month]) {
                snapshot.monthly.append(.init(key: row["key_id"], model: row["model"], tally: Self.tally(row)))
            }
            return snapshot
        }
    }

    private static func tally(_ row: Row) -> Tally {
        Tally(
            requests: count(row, "requests"),
            promptTokens: count(row, "prompt_tokens"),
            completionTokens: count(row, "completion_tokens"),
            totalTokens: count(row, "total_tokens")
        )
    }

    /// A counter column as an integer, whatever the file holds: NULL or text is 0, a REAL (an overflowed sum in a
    /// file of the earlier bridge) is clamped.
    static func count(_ row: Row, _ column: String) -> Int64 {
        switch (row[column] as DatabaseValue).storage {
        case .int64(let value): return value
        case .double(let value) where value.isFinite:
            return value >= 9.2e18 ? Int64.max : (value <= -9.2e18 ? Int64.min : Int64(value))
        default: return 0
        }
    }

    static let earlierMonthlySQL = """
        SELECT subkey, model, usage_month, requests, prompt_tokens, completion_tokens, total_tokens
        FROM monthly_usage WHERE usage_month = ?
        """

    public func directory() async throws -> KeyDirectory {
        try await read { db in
            // The earlier bridge's tools may have made these tables since this connection last looked.
            db.clearSchemaCache()
            var directory = KeyDirectory()
            if try db.tableExists("subkey_names") {
                let hasEmail = try db.columns(in: "subkey_names").contains { $0.name == "email" }
                let sql = "SELECT subkey, friendly_name\(hasEmail ? ", email" : "") FROM subkey_names"
                for row in try Row.fetchAll(db, sql: sql) {
                    guard let subkey: String = row["subkey"] else { continue }
                    var entry = KeyDirectory.Entry()
                    entry.friendlyName = Self.nonEmpty(row["friendly_name"])
                    if hasEmail { entry.email = Self.nonEmpty(row["email"]) }
                    directory.entries[SubkeyDigest(subkey)] = entry
                }
            }
            if try db.tableExists("key_lifecycle") {
                for row in try Row.fetchAll(db, sql: "SELECT subkey, status FROM key_lifecycle") {
                    guard let subkey: String = row["subkey"] else { continue }
                    directory.entries[SubkeyDigest(subkey), default: KeyDirectory.Entry()].status = row["status"]
                }
            }
            return directory
        }
    }

    private static func nonEmpty(_ text: String?) -> String? {
        guard let text, !text.trimmingCharacters(in: .whitespaces).isEmpty else { return nil }
        return text
    }

    public func commit(
        _ entries: [LedgerEntry],
        events: [OutboxEvent],
        purgingLogBefore cutoff: Double?,
        purgeLimit: Int
    ) async throws -> Int {
        // Not cancellable on purpose: the batch holds other requests' records, and the task that happens to write it
        // may be cancelled (its client left). GRDB's async `write` would interrupt the transaction in that case.
        let purged = try await withCheckedThrowingContinuation { continuation in
            database.asyncWriteWithoutTransaction { db in
                let result = Result {
                    try self.runTransaction(entries, events: events, purgingLogBefore: cutoff, purgeLimit: purgeLimit, db)
                }
                // A request's task prefers its connection's event loop as executor, so it goes on there, which also
                // answers its client: one wake of the loop, and no second trip through its queue.
                continuation.resume(with: result)
            }
        }
        checkpointIfDue()
        return purged
    }

    /// On the caller's thread (GRDB's queue runs it there when it is idle, else the caller waits for what it runs),
    /// with SQLite's busy wait off for the transaction: another process's write lock sends the records to `commit`
    /// at once rather than holding the caller (an event loop) for up to `busyTimeout`.
    public func commitAtOnce(_ entries: [LedgerEntry], events: [OutboxEvent]) throws -> Bool {
        guard otherWork.load(ordering: .relaxed) == 0 else { return false }
        let written = try database.writeWithoutTransaction { db -> Bool in
            guard let connection = db.sqliteConnection else { throw DatabaseError(resultCode: .SQLITE_MISUSE) }
            sqlite3_busy_timeout(connection, 0)
            defer { sqlite3_busy_timeout(connection, Int32(Self.busyTimeout * 1000)) }
            do {
                _ = try runTransaction(entries, events: events, purgingLogBefore: nil, purgeLimit: 0, db)
                return true
            } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY {
                return false
            }
        }
        if written { checkpointIfDue() }
        return written
    }

    /// One transaction of the ledger: `events` queued, `entries` written, old log rows purged.
    private func runTransaction(
        _ entries: [LedgerEntry],
        events: [OutboxEvent],
        purgingLogBefore cutoff: Double?,
        purgeLimit: Int,
        _ db: Database
    ) throws -> Int {
        let transaction = try LedgerTransaction(db)
        return try transaction.run {
            try queue(events, transaction)
            return try Self.write(
                entries,
                firstID: takeIDs(entries.count),
                purgingLogBefore: cutoff,
                purgeLimit: purgeLimit,
                transaction,
                db
            )
        }
    }

    /// Starts a passive checkpoint on the second connection every `commitsPerCheckpoint` commits, unless one is
    /// still running. It runs beside the writer (SQLite lets a checkpoint and a writer work at once), on GRDB's
    /// queue, and nobody waits for it.
    private func checkpointIfDue() {
        guard let checkpointer else { return }
        let due = checkpointState.withLock { state in
            state.commits += 1
            guard state.commits >= Self.commitsPerCheckpoint, !state.running else { return false }
            state.commits = 0
            state.running = true
            return true
        }
        guard due else { return }
        checkpointer.asyncWriteWithoutTransaction { db in
            let walFrames = (try? db.checkpoint(.passive))?.walFrameCount ?? 0
            self.checkpointState.withLock { $0.running = false }
            // Under unbroken load a checkpoint beside the writer never quite catches up, and the WAL starts again
            // only once one has (with no commit in between). Past a bound, a second checkpoint runs between two
            // commits on the writer's own queue: it copies only what the first could not (little), and lets the
            // next commit start the WAL from the beginning.
            if walFrames > self.walFrameLimit {
                self.otherWork.add(1, ordering: .relaxed)
                self.database.asyncWriteWithoutTransaction { db in
                    _ = try? db.checkpoint(.passive)
                    self.otherWork.subtract(1, ordering: .relaxed)
                }
            }
        }
    }

    /// `count` ids in a row. Taken on the writer's queue, one transaction after another, so ids grow in commit
    /// order (a failed transaction leaves a gap, which is harmless).
    private func takeIDs(_ count: Int) -> Int64 {
        nextEventID.withLock { next in
            defer { next += Int64(count) }
            return next
        }
    }

    private func queue(_ events: [OutboxEvent], _ transaction: LedgerTransaction) throws {
        guard !events.isEmpty else { return }
        let first = takeIDs(events.count)
        for (offset, event) in events.enumerated() {
            try transaction.execute(Self.outboxInsert) { values in
                values.bind(first + Int64(offset))
                values.bind(event.kind.rawValue)
                values.bind(event.time)
                values.bind(event.body)
            }
        }
    }

    /// About 16 MiB of WAL with 4 KiB pages.
    static let maximumWALFrames = 4_096

    /// Adds a row's counts to the existing ones, saturating: a sum past SQLite's integer range would become a
    /// REAL that no later read could take as an integer.
    static let addition = """
        requests = min(requests + excluded.requests, \(Int64.max)),
          prompt_tokens = min(prompt_tokens + excluded.prompt_tokens, \(Int64.max)),
          completion_tokens = min(completion_tokens + excluded.completion_tokens, \(Int64.max)),
          total_tokens = min(total_tokens + excluded.total_tokens, \(Int64.max))
        """

    static let outboxInsert = "INSERT INTO splunk_outbox (id, kind, time, event) VALUES (?, ?, ?, ?)"
    static let lifetimeUpsert = """
        INSERT INTO usage (subkey, model, requests, prompt_tokens, completion_tokens, total_tokens)
        VALUES (?, ?, ?, ?, ?, ?)
        ON CONFLICT (subkey, model) DO UPDATE SET \(addition)
        """
    static let periodUpsert = """
        INSERT INTO usage_period (key_id, model, period, period_start, requests, prompt_tokens,
          completion_tokens, total_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (period, period_start, key_id, model) DO UPDATE SET \(addition)
        """
    /// Two period rows in one statement (a request's day and month): one statement to step instead of two.
    static let periodUpsertPair = """
        INSERT INTO usage_period (key_id, model, period, period_start, requests, prompt_tokens,
          completion_tokens, total_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?), (?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (period, period_start, key_id, model) DO UPDATE SET \(addition)
        """
    static let logInsert = """
        INSERT INTO request_log (id, finished_at, request_id, key_id, subkey_hash, friendly_name, email, model,
          status_code, prompt_tokens, completion_tokens, total_tokens, is_streaming, latency_ms,
          client_disconnected, client_ip, x_forwarded_for, splunk_event)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        """

    private static func write(
        _ entries: [LedgerEntry],
        firstID: Int64,
        purgingLogBefore cutoff: Double?,
        purgeLimit: Int,
        _ transaction: LedgerTransaction,
        _ db: Database
    ) throws -> Int {
        let (lifetime, periods) = tallies(of: entries)
        for (key, tally) in lifetime {
            try transaction.execute(Self.lifetimeUpsert) { values in
                values.bind(key.ledgerKey)
                values.bind(key.model)
                tally.bind(to: &values)
            }
        }
        func bind(_ row: (key: PeriodKey, value: Tally), to values: inout LedgerTransaction.Bindings) {
            values.bind(row.key.keyID)
            values.bind(row.key.model)
            values.bind(row.key.period)
            values.bind(row.key.start)
            row.value.bind(to: &values)
        }
        // Two rows at a time (the keys differ, so neither row of a pair updates the other).
        var rows = periods.makeIterator()
        while let first = rows.next() {
            if let second = rows.next() {
                try transaction.execute(Self.periodUpsertPair) { values in
                    bind(first, to: &values)
                    bind(second, to: &values)
                }
            } else {
                try transaction.execute(Self.periodUpsert) { values in bind(first, to: &values) }
            }
        }
        for (offset, entry) in entries.enumerated() {
            try transaction.execute(Self.logInsert) { values in
                values.bind(firstID + Int64(offset))
                values.bind(entry.finishedAt)
                values.bind(entry.requestID)
                values.bind(entry.keyID)
                values.bind(entry.subkeyHash)
                values.bind(entry.friendlyName)
                values.bind(entry.email)
                values.bind(entry.model)
                values.bind(entry.statusCode)
                values.bind(entry.usage.promptTokens)
                values.bind(entry.usage.completionTokens)
                values.bind(entry.usage.totalTokens)
                values.bind(entry.isStreaming)
                values.bind(entry.latencySeconds * 1000)
                values.bind(entry.clientDisconnected)
                values.bind(entry.clientAddress)
                values.bind(entry.forwardedFor)
                values.bind(entry.hasUsageEvent)
            }
        }
        guard let cutoff else { return 0 }
        // Rows below the first that finished after the cutoff, oldest first; a row whose usage event Splunk has yet to
        // get stays (the spool's limit bounds how many can wait). One that finished early but was written late (a
        // clock stepped back) goes with a later purge.
        let boundary = try firstLogID(finishedAtOrAfter: cutoff, db) ?? Int64.max
        try db.execute(
            sql: """
                DELETE FROM request_log WHERE id IN
                  (SELECT id FROM request_log WHERE id < ? AND finished_at < ?
                     AND (splunk_event = 0 OR id <= (SELECT shipped_through FROM splunk_log_cursor))
                   ORDER BY id LIMIT ?)
                """,
            arguments: [boundary, cutoff, purgeLimit]
        )
        let purged = db.changesCount
        // Events Splunk refused are kept as long as the request log (rare, so no batch limit is needed).
        try db.execute(sql: "DELETE FROM splunk_dead_letter WHERE set_aside_at < ?", arguments: [cutoff])
        return purged
    }

    private struct LifetimeKey: Hashable {
        var ledgerKey: String
        var model: String
    }

    private struct PeriodKey: Hashable {
        var keyID: String
        var model: String
        var period: String
        var start: String
    }

    /// The rows a batch adds to: requests of one key and model share one upsert per row. A batch of one (every
    /// commit at concurrency 1) has its three rows as they are, without a dictionary to gather them.
    private static func tallies(
        of entries: [LedgerEntry]
    ) -> (lifetime: [(key: LifetimeKey, value: Tally)], periods: [(key: PeriodKey, value: Tally)]) {
        func rows(of entry: LedgerEntry) -> (LifetimeKey, Tally, PeriodKey, PeriodKey) {
            var tally = Tally(requests: 1)
            tally.add(entry.usage)
            return (
                LifetimeKey(ledgerKey: entry.ledgerKey, model: entry.model), tally,
                PeriodKey(keyID: entry.keyID, model: entry.model, period: "daily", start: entry.day),
                PeriodKey(keyID: entry.keyID, model: entry.model, period: "monthly", start: entry.month)
            )
        }
        if entries.count == 1 {
            let (lifetime, tally, day, month) = rows(of: entries[0])
            return ([(lifetime, tally)], [(day, tally), (month, tally)])
        }
        var lifetime: [LifetimeKey: Tally] = [:]
        var periods: [PeriodKey: Tally] = [:]
        for entry in entries {
            let (key, tally, day, month) = rows(of: entry)
            lifetime[key, default: Tally()].add(tally)
            periods[day, default: Tally()].add(tally)
            periods[month, default: Tally()].add(tally)
        }
        return (lifetime.map { $0 }, periods.map { $0 })
    }

    /// Where a read of the log rows that finished at or after `time` starts: `firstLogID(finishedAtOrAfter:)` an hour
    /// earlier, so that a row written a little out of order is not missed (the reader still filters on `finished_at`).
    static func firstLogID(readingFrom time: Double, _ db: Database) throws -> Int64? {
        try firstLogID(finishedAtOrAfter: time - 3_600, db)
    }

    /// Where the request log reaches `time`: an id below which no row finished at or after it, and from which rows
    /// did (`nil` when none did). Rows are written in the order requests finish, to within a group commit, so ids are
    /// bisected on `finished_at` (a few seeks), with no index to keep up on every commit. A clock stepped back can put
    /// a row on the wrong side: callers that must not miss one filter on `finished_at` and start a margin earlier.
    static func firstLogID(finishedAtOrAfter time: Double, _ db: Database) throws -> Int64? {
        guard let bounds = try Row.fetchOne(db, sql: "SELECT min(id) AS low, max(id) AS high FROM request_log"),
            let first: Int64 = bounds["low"], let last: Int64 = bounds["high"]
        else { return nil }
        let probe = try db.cachedStatement(
            sql: "SELECT id, finished_at FROM request_log WHERE id >= ? ORDER BY id LIMIT 1"
        )
        // The answer is in low...high, where last + 1 means that no row finished at or after `time`.
        var (low, high) = (first, last + 1)
        while low < high {
            let middle = low + (high - low) / 2
            // There is a row at or above every id up to `last`.
            guard let row = try Row.fetchOne(probe, arguments: [middle]) else { break }
            let (id, finished): (Int64, Double) = (row["id"], row["finished_at"])
            if finished >= time { high = middle } else { low = id + 1 }
        }
        return low > last ? nil : low
    }

    public func report(_ query: UsageQuery) async throws -> [UsageReportRow] {
        try await read { db in
            var rows: [UsageReportRow] = []
            let byPeriod = query.since != nil || query.until != nil || query.grouping == .day || query.grouping == .month
            if !byPeriod {
                guard try db.tableExists("usage") else { return [] }
                return try Self.rowsBySubkey(db, table: "usage", periodColumn: nil, query: query)
            }
            guard try db.tableExists("usage_period") else {
                // A file of the earlier bridge not yet migrated: only its monthly totals have periods.
                guard query.grouping == .month, query.since == nil, query.until == nil,
                    try db.tableExists("monthly_usage")
                else { return [] }
                return try Self.rowsBySubkey(db, table: "monthly_usage", periodColumn: "usage_month", query: query)
            }
            // Dates select daily rows; a month report without dates reads the monthly rows, which also hold the
            // earlier bridge's history.
            let useMonthly = query.grouping == .month && query.since == nil && query.until == nil
            var sql = """
                SELECT key_id, model, period_start, requests, prompt_tokens, completion_tokens, total_tokens
                FROM usage_period WHERE period = ?
                """
            var arguments: StatementArguments = [useMonthly ? "monthly" : "daily"]
            if let since = query.since {
                sql += " AND period_start >= ?"
                arguments += [PeriodCalendar.dayString(since)]
            }
            if let until = query.until {
                sql += " AND period_start <= ?"
                arguments += [PeriodCalendar.dayString(until)]
            }
            if let model = query.model {
                sql += " AND model = ?"
                arguments += [model]
            }
            for row in try Row.fetchAll(db, sql: sql, arguments: arguments) {
                let keyID: String = row["key_id"]
                if let keep = query.keyIDs, !keep.contains(keyID) { continue }
                rows.append(
                    UsageReportRow(keyID: keyID, model: row["model"], period: row["period_start"], tally: Self.tally(row))
                )
            }
            return rows
        }
    }

    /// Report rows of a table keyed by `usage.subkey` values (the lifetime `usage`, or the earlier bridge's
    /// `monthly_usage` with its `periodColumn`), under their key ids and filtered as `query` asks.
    private static func rowsBySubkey(
        _ db: Database,
        table: String,
        periodColumn: String?,
        query: UsageQuery
    ) throws -> [UsageReportRow] {
        let period = periodColumn.map { "\($0), " } ?? ""
        var sql = "SELECT subkey, model, \(period)requests, prompt_tokens, completion_tokens, total_tokens FROM \(table)"
        var arguments: StatementArguments = []
        if let model = query.model {
            sql += " WHERE model = ?"
            arguments += [model]
        }
        var rows: [UsageReportRow] = []
        // A managed key's `usage.subkey` is its id already.
        let managed = try db.tableExists("managed_key") ? Set(try String.fetchAll(db, sql: "SELECT id FROM managed_key")) : []
        for row in try Row.fetchAll(db, sql: sql, arguments: arguments) {
            let keyID = LedgerKeys.keyID(forLedgerKey: row["subkey"], isManaged: managed.contains)
            if let keep = query.keyIDs, !keep.contains(keyID) { continue }
            let start: String? = periodColumn.flatMap { row[$0] }
            rows.append(UsageReportRow(keyID: keyID, model: row["model"], period: start, tally: tally(row)))
        }
        return rows
    }

    /// Every `usage.subkey` value: `usage report --subkey` and `quotas check --db` match keys by value or hash.
    public func ledgerKeys() async throws -> [String] {
        try await read { db in
            guard try db.tableExists("usage") else { return [] }
            return try String.fetchAll(db, sql: "SELECT DISTINCT subkey FROM usage")
        }
    }

    /// Rows of the request log, oldest first (for tests; GRDB's rows are not `Sendable`, so this is its blocking read).
    public func requestLog(since: Double = 0) async throws -> [Row] {
        try database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM request_log WHERE finished_at >= ? ORDER BY id", arguments: [since])
        }
    }

    /// Up to `limit` request-log entries finished in `[since, until)` with ids above `id`, oldest first, with
    /// their ids (`hec replay`).
    public func requestLog(
        after id: Int64,
        since: Double,
        until: Double,
        limit: Int
    ) async throws -> [(id: Int64, entry: LedgerEntry)] {
        try await read { db in
            guard try db.tableExists("request_log") else { return [] }
            guard let start = try Self.firstLogID(readingFrom: since, db) else { return [] }
            return try Row.fetchAll(
                db,
                sql: """
                    SELECT * FROM request_log WHERE id > ? AND id >= ? AND finished_at >= ? AND finished_at < ?
                    ORDER BY id LIMIT ?
                    """,
                arguments: [id, start, since, until, limit]
            ).map { row in (row["id"], LedgerEntry(logRow: row)) }
        }
    }

    // MARK: Splunk outbox

    /// The outbox's events and the marked request-log rows' usage events above `id` (and above the log's cursor),
    /// merged in id order: one queue, read in one transaction.
    public func pendingEvents(after id: Int64, limit: Int) async throws -> [PendingEvent] {
        try await (outboxReader ?? database).read { db in
            let queued = try Row.fetchAll(
                db,
                sql: "SELECT id, kind, time, event FROM splunk_outbox WHERE id > ? ORDER BY id LIMIT ?",
                arguments: [id, limit]
            ).map { row in
                let body: Data = row["event"]
                let kind = OutboxEvent.Kind(rawValue: row["kind"]) ?? .usage
                return PendingEvent(id: row["id"], event: OutboxEvent(kind: kind, time: row["time"], body: Array(body)))
            }
            let logged = try Self.loggedUsageEvents(after: id, limit: limit, db)
            guard !queued.isEmpty, !logged.isEmpty else { return queued.isEmpty ? logged : queued }
            var merged: [PendingEvent] = []
            merged.reserveCapacity(min(limit, queued.count + logged.count))
            var (outbox, log) = (queued[...], logged[...])
            while merged.count < limit, let next = Self.earlier(&outbox, &log) { merged.append(next) }
            return merged
        }
    }

    /// The usage events of marked request-log rows above `id` and the log's cursor, oldest first. Read straight from
    /// SQLite's row buffers: the shipper reads every answered request's row, and GRDB's rows (each copied, each
    /// column found by name) cost more than the event made from them.
    private static func loggedUsageEvents(after id: Int64, limit: Int, _ db: Database) throws -> [PendingEvent] {
        let statement = try db.cachedStatement(sql: loggedEventsQuery).sqliteStatement
        defer {
            sqlite3_reset(statement)
            sqlite3_clear_bindings(statement)
        }
        sqlite3_bind_int64(statement, 1, id)
        sqlite3_bind_int64(statement, 2, Int64(limit))
        var events: [PendingEvent] = []
        while true {
            let code = sqlite3_step(statement)
            if code == SQLITE_DONE { return events }
            guard code == SQLITE_ROW else {
                throw DatabaseError(
                    resultCode: ResultCode(rawValue: code),
                    message: String(cString: sqlite3_errmsg(db.sqliteConnection))
                )
            }
            let columns = LoggedColumns(statement: statement)
            let entry = LedgerEntry(logged: columns)
            events.append(PendingEvent(id: columns.integer(0), event: SplunkEvent.usageEvent(entry)))
        }
    }

    /// The columns `LedgerEntry(logged:)` reads, in its order.
    private static let loggedEventsQuery = """
        SELECT id, finished_at, request_id, key_id, subkey_hash, friendly_name, email, model, status_code,
          prompt_tokens, completion_tokens, total_tokens, is_streaming, latency_ms, client_disconnected, client_ip,
          x_forwarded_for
        FROM request_log
        WHERE id > max(?, (SELECT shipped_through FROM splunk_log_cursor)) AND splunk_event = 1
        ORDER BY id LIMIT ?
        """

    /// Takes the head with the lower id of two runs ordered by id.
    private static func earlier(
        _ first: inout ArraySlice<PendingEvent>,
        _ second: inout ArraySlice<PendingEvent>
    ) -> PendingEvent? {
        guard let a = first.first else { return second.popFirst() }
        guard let b = second.first, b.id < a.id else { return first.popFirst() }
        return second.popFirst()
    }

    /// Splunk has, or has set aside, every usage event of the log up to `id`: the cursor moves there (never back).
    public func settled(through id: Int64) async throws {
        try await write { db in
            try db.execute(
                sql: "UPDATE splunk_log_cursor SET shipped_through = max(shipped_through, ?) WHERE id = 1",
                arguments: [id]
            )
        }
    }

    public func delivered(_ ids: ClosedRange<Int64>) async throws {
        try await write { db in
            try db.execute(
                sql: "DELETE FROM splunk_outbox WHERE id BETWEEN ? AND ?",
                arguments: [ids.lowerBound, ids.upperBound]
            )
        }
    }

    public func deadLetter(_ event: PendingEvent, answer: String, at time: Double) async throws {
        try await write { db in
            try db.execute(
                sql: """
                    INSERT INTO splunk_dead_letter (outbox_id, kind, time, event, set_aside_at, answer)
                    VALUES (?, ?, ?, ?, ?, ?)
                    """,
                arguments: [event.id, event.event.kind.rawValue, event.event.time, Data(event.event.body), time, answer]
            )
            try db.execute(sql: "DELETE FROM splunk_outbox WHERE id = ?", arguments: [event.id])
        }
    }

    public func outboxCounts() async throws -> OutboxCounts {
        try await read { db in
            var counts = OutboxCounts()
            guard try db.tableExists("splunk_outbox") else { return counts }
            for row in try Row.fetchAll(
                db,
                sql: "SELECT kind, count(*) AS n, min(time) AS oldest FROM splunk_outbox GROUP BY kind"
            ) {
                let kind: String = row["kind"]
                let oldest: Double = row["oldest"]
                if kind == OutboxEvent.Kind.error.rawValue { counts.error = row["n"] } else { counts.usage += row["n"] }
                counts.oldest = min(counts.oldest ?? oldest, oldest)
            }
            if try db.tableExists("splunk_log_cursor"),
                let row = try Row.fetchOne(
                    db,
                    sql: """
                        SELECT count(*) AS n, min(finished_at) AS oldest FROM request_log
                        WHERE id > (SELECT shipped_through FROM splunk_log_cursor) AND splunk_event = 1
                        """
                ), let oldest: Double = row["oldest"]
            {
                counts.usage += row["n"] as Int
                counts.oldest = min(counts.oldest ?? oldest, oldest)
            }
            counts.deadLettered = try Int.fetchOne(db, sql: "SELECT count(*) FROM splunk_dead_letter") ?? 0
            return counts
        }
    }

    /// A small transaction beside the group commit (shipper acknowledgements). Not cancellable either: a cancelled
    /// shipper at shutdown must not leave half of one behind (a transaction is all or nothing anyway).
    private func write(_ updates: @escaping @Sendable (Database) throws -> Void) async throws {
        otherWork.add(1, ordering: .relaxed)
        defer { otherWork.subtract(1, ordering: .relaxed) }
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            database.asyncWrite(updates, completion: { _, result in continuation.resume(with: result) })
        }
        checkpointIfDue()
    }

    /// A read on the writer's queue, counted in `otherWork`.
    func read<T: Sendable>(_ value: @escaping @Sendable (Database) throws -> T) async throws -> T {
        otherWork.add(1, ordering: .relaxed)
        defer { otherWork.subtract(1, ordering: .relaxed) }
        return try await database.read(value)
    }

    public func close() async throws {
        try outboxReader?.close()
        try checkpointer?.close()
        try database.close()
    }
}

extension LedgerEntry {
    /// An entry as the request log kept it (`hec replay`); the period fields are not needed there and stay empty.
    init(logRow row: Row) {
        ledgerKey = ""
        keyID = row["key_id"]
        subkeyHash = row["subkey_hash"]
        friendlyName = row["friendly_name"]
        email = row["email"]
        model = row["model"]
        usage = Usage(
            promptTokens: row["prompt_tokens"],
            completionTokens: row["completion_tokens"],
            totalTokens: row["total_tokens"]
        )
        day = ""
        month = ""
        finishedAt = row["finished_at"]
        requestID = row["request_id"]
        statusCode = row["status_code"]
        isStreaming = row["is_streaming"]
        latencySeconds = (row["latency_ms"] as Double) / 1000
        clientDisconnected = row["client_disconnected"]
        clientAddress = row["client_ip"]
        forwardedFor = row["x_forwarded_for"]
    }
}

/// The current row of a stepped statement, by column number.
struct LoggedColumns {
    let statement: OpaquePointer

    func integer(_ column: Int32) -> Int64 { sqlite3_column_int64(statement, column) }
    func real(_ column: Int32) -> Double { sqlite3_column_double(statement, column) }

    /// Text as SQLite holds it (a NULL is `nil`).
    func text(_ column: Int32) -> String? {
        guard let bytes = sqlite3_column_text(statement, column) else { return nil }
        let count = Int(sqlite3_column_bytes(statement, column))
        return String(decoding: UnsafeBufferPointer(start: bytes, count: count), as: UTF8.self)
    }
}

extension LedgerEntry {
    /// A request-log row as `SQLiteLedger.loggedEventsQuery` selects it; the period fields stay empty.
    init(logged row: LoggedColumns) {
        ledgerKey = ""
        keyID = row.text(3) ?? ""
        subkeyHash = row.text(4) ?? ""
        friendlyName = row.text(5)
        email = row.text(6)
        model = row.text(7) ?? ""
        usage = Usage(
            promptTokens: Int(clamping: row.integer(9)),
            completionTokens: Int(clamping: row.integer(10)),
            totalTokens: Int(clamping: row.integer(11))
        )
        day = ""
        month = ""
        finishedAt = row.real(1)
        requestID = row.text(2) ?? ""
        statusCode = Int(clamping: row.integer(8))
        isStreaming = row.integer(12) != 0
        latencySeconds = row.real(13) / 1000
        clientDisconnected = row.integer(14) != 0
        clientAddress = row.text(15) ?? ""
        forwardedFor = row.text(16) ?? ""
    }
}

extension Tally {
    /// The four counters, in the order the upserts list them.
    fileprivate func bind(to values: inout LedgerTransaction.Bindings) {
        values.bind(requests)
        values.bind(promptTokens)
        values.bind(completionTokens)
        values.bind(totalTokens)
    }
}
