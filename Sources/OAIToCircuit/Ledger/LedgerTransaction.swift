import GRDB
import GRDBSQLite

/// The ledger's per-request transaction through SQLite's C interface, on GRDB's own connection and queue.
///
/// At concurrency 1 every answer waits for one of these. Through GRDB's statement API the transaction cost about
/// 60 µs more (argument arrays of existentials, per-statement hooks, a deferred transaction upgraded late). Here
/// the statements are still GRDB's cached ones (GRDB finalizes them), but values are bound and stepped directly,
/// and the transaction begins `IMMEDIATE`, so it takes the write lock once, up front.
struct LedgerTransaction {
    private let db: Database
    private let connection: OpaquePointer

    init(_ db: Database) throws {
        guard let connection = db.sqliteConnection else { throw DatabaseError(resultCode: .SQLITE_MISUSE) }
        self.db = db
        self.connection = connection
    }

    /// Runs `body` between `BEGIN IMMEDIATE` and `COMMIT`; rolls back when either it or the commit fails.
    func run<T>(_ body: () throws -> T) throws -> T {
        try execute("BEGIN IMMEDIATE")
        do {
            let result = try body()
            try execute("COMMIT")
            return result
        } catch {
            // After some errors SQLite has already rolled back; a second rollback then fails harmlessly.
            if sqlite3_get_autocommit(connection) == 0 { sqlite3_exec(connection, "ROLLBACK", nil, nil, nil) }
            throw error
        }
    }

    /// Binds `bind`'s values to the cached statement for `sql` and steps it to its end.
    func execute(_ sql: String, bind: (inout Bindings) -> Void = { _ in }) throws {
        let statement = try db.cachedStatement(sql: sql).sqliteStatement
        var bindings = Bindings(statement: statement)
        bind(&bindings)
        guard bindings.failure == SQLITE_OK else {
            // Nothing of this statement's values may stay bound for the next one.
            sqlite3_clear_bindings(statement)
            throw DatabaseError(resultCode: ResultCode(rawValue: bindings.failure), message: "a value could not be bound")
        }
        try step(statement)
    }

    /// Steps a statement whose values are bound, then resets it (its bindings are cleared when it is next bound).
    func step(_ statement: OpaquePointer) throws {
        defer { sqlite3_reset(statement) }
        var code = sqlite3_step(statement)
        while code == SQLITE_ROW { code = sqlite3_step(statement) }
        guard code == SQLITE_DONE else {
            // The message only: SQLite's messages name tables and constraints, never bound values.
            throw DatabaseError(
                resultCode: ResultCode(rawValue: sqlite3_extended_errcode(connection)),
                message: String(cString: sqlite3_errmsg(connection))
            )
        }
    }

    /// Binds values in order, from the first parameter. Text and blobs are copied by SQLite (`SQLITE_TRANSIENT`),
    /// since the bytes handed over live only for the call.
    struct Bindings {
        let statement: OpaquePointer
        private var index: Int32 = 0
        /// The first binding SQLite refused (too big, say), if any: the statement must not run with it.
        private(set) var failure = SQLITE_OK

        init(statement: OpaquePointer) {
            self.statement = statement
        }

        private static let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)

        private mutating func next() -> Int32 {
            index += 1
            return index
        }

        private mutating func check(_ code: Int32) {
            if code != SQLITE_OK, failure == SQLITE_OK { failure = code }
        }

        mutating func bind(_ value: String) {
            // As GRDB binds text (up to a NUL, should one be inside), so readers through GRDB find what was written.
            check(sqlite3_bind_text(statement, next(), value, -1, Self.transient))
        }

        mutating func bind(_ value: String?) {
            guard let value else { return check(sqlite3_bind_null(statement, next())) }
            bind(value)
        }

        mutating func bind(_ value: Int64) { check(sqlite3_bind_int64(statement, next(), value)) }
        mutating func bind(_ value: Int) { check(sqlite3_bind_int64(statement, next(), Int64(value))) }
        mutating func bind(_ value: Bool) { check(sqlite3_bind_int64(statement, next(), value ? 1 : 0)) }
        mutating func bind(_ value: Double) { check(sqlite3_bind_double(statement, next(), value)) }

        mutating func bind(_ bytes: [UInt8]) {
            let index = next()
            let code = bytes.withUnsafeBytes { raw in
                guard let base = raw.baseAddress, !raw.isEmpty else {
                    // A blob without a pointer would be NULL; the column holds a zero-length blob instead.
                    return sqlite3_bind_zeroblob(statement, index, 0)
                }
                return sqlite3_bind_blob(statement, index, base, Int32(clamping: raw.count), Self.transient)
            }
            check(code)
        }
    }
}
