import Foundation
import GRDB

@testable import OAIToCircuit

/// Reads and prepares SQLite files the way another process would: a connection of its own, closed after use.
enum TestDatabase {
    static func rows(_ path: String, _ sql: String, _ arguments: StatementArguments = []) throws -> [Row] {
        var configuration = Configuration()
        configuration.readonly = true
        let queue = try DatabaseQueue(path: path, configuration: configuration)
        defer { try? queue.close() }
        return try queue.read { try Row.fetchAll($0, sql: sql, arguments: arguments) }
    }

    static func count(_ path: String, _ sql: String, _ arguments: StatementArguments = []) throws -> Int {
        try rows(path, sql, arguments).first?[0] ?? 0
    }

    /// Splunk events waiting in a bridge's database: the outbox's, and the usage events of request-log rows marked for
    /// Splunk above the log's cursor.
    static func pendingSplunkEvents(_ path: String) throws -> Int {
        try count(
            path,
            """
            SELECT (SELECT count(*) FROM splunk_outbox) + (SELECT count(*) FROM request_log
              WHERE splunk_event = 1 AND id > (SELECT shipped_through FROM splunk_log_cursor))
            """
        )
    }

    /// Runs SQL as the earlier bridge (Python's sqlite3) would have: no WAL, no migrations, foreign keys unchecked.
    static func execute(_ path: String, _ sql: String, _ arguments: StatementArguments = []) throws {
        var configuration = Configuration()
        configuration.foreignKeysEnabled = false
        let queue = try DatabaseQueue(path: path, configuration: configuration)
        defer { try? queue.close() }
        try queue.write { try $0.execute(sql: sql, arguments: arguments) }
    }

    /// The `usage` row of a key and model.
    static func usage(_ path: String, subkey: String, model: String) throws -> Tally? {
        try rows(path, "SELECT * FROM usage WHERE subkey = ? AND model = ?", [subkey, model]).first.map {
            Tally(
                requests: $0["requests"],
                promptTokens: $0["prompt_tokens"],
                completionTokens: $0["completion_tokens"],
                totalTokens: $0["total_tokens"]
            )
        }
    }

    /// The earlier bridge's schema, as its files hold it.
    static let earlierUsageTable = """
        CREATE TABLE IF NOT EXISTS usage (subkey TEXT NOT NULL, model TEXT NOT NULL,
          requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
          completion_tokens INTEGER NOT NULL DEFAULT 0, total_tokens INTEGER NOT NULL DEFAULT 0,
          PRIMARY KEY (subkey, model))
        """

    static let earlierNewerTables = """
        CREATE TABLE IF NOT EXISTS monthly_usage (subkey TEXT NOT NULL, model TEXT NOT NULL, usage_month TEXT NOT NULL,
          requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
          completion_tokens INTEGER NOT NULL DEFAULT 0, total_tokens INTEGER NOT NULL DEFAULT 0,
          PRIMARY KEY (subkey, model, usage_month));
        CREATE TABLE IF NOT EXISTS subkey_names (subkey TEXT PRIMARY KEY, friendly_name TEXT NOT NULL, email TEXT,
          description TEXT, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
        CREATE INDEX IF NOT EXISTS idx_friendly_name ON subkey_names(friendly_name);
        CREATE TABLE IF NOT EXISTS key_lifecycle (subkey TEXT PRIMARY KEY, user_id TEXT,
          status TEXT NOT NULL DEFAULT 'active', revoked_at TIMESTAMP, revoke_reason TEXT, replaced_by TEXT,
          replaces TEXT, FOREIGN KEY (replaced_by) REFERENCES key_lifecycle(subkey),
          FOREIGN KEY (replaces) REFERENCES key_lifecycle(subkey));
        """
}

extension Harness {
    var databasePath: String { bridge.configuration.quotaDatabasePath }
}
