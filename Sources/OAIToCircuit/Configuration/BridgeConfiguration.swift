import Foundation
import Logging

/// Everything `serve` needs, read once at start from flags and the environment.
///
/// Environment variables (an empty value means unset):
/// `CIRCUIT_CLIENT_ID`, `CIRCUIT_CLIENT_SECRET`, `CIRCUIT_APPKEY`, `CIRCUIT_BASE`, `TOKEN_URL`, `API_VERSION`,
/// `CIRCUIT_MODELS`, `REQUIRE_SUBKEY`, `MAX_REQUEST_BYTES`, `UPSTREAM_TIMEOUT_SECONDS`,
/// `UPSTREAM_MAX_CONNECTIONS`, `SHUTDOWN_GRACE_SECONDS`, `LOG_LEVEL`, `CORS_ALLOW_ORIGINS`,
/// `QUOTA_DB_PATH`, `QUOTAS_JSON`, `QUOTAS_JSON_PATH`, `USAGE_LOG_RETENTION_DAYS`, and the `SPLUNK_*` family.
public struct BridgeConfiguration: Sendable {
    public enum TLSMode: Sendable, Equatable {
        /// HTTP only.
        case off
        /// HTTP and HTTPS in one process (`--ssl`).
        case both
        /// HTTPS only (`--ssl-only`).
        case only
    }

    public struct Listener: Sendable, Equatable {
        public var host: String = "0.0.0.0"
        public var port: Int = 12000
        public var sslPort: Int = 12443
        public var tls: TLSMode = .off
        public var certificatePath: String = "cert.pem"
        public var privateKeyPath: String = "key.pem"
        public init() {}
    }

    public static let knownModels = ["gpt-4.1", "gpt-4o-mini", "gpt-4o", "o4-mini", "o3", "gemini-2.5-flash", "gemini-2.5-pro"]

    public var listener = Listener()
    /// OAuth2 client credentials; `nil` when not configured (chat then answers 502).
    public var credentials: ClientCredentials?
    public var appKey: String = ""
    public var circuitBase: UpstreamURL
    public var tokenURL: UpstreamURL
    public var apiVersion: String = "2025-04-01-preview"
    public var models: [String] = Self.knownModels
    public var requireSubkey = true
    public var maxRequestBytes = 16 * 1024 * 1024
    /// Bounds the wait for Circuit's response headers and each gap between streamed chunks.
    public var upstreamTimeout: Duration = .seconds(90)
    /// Connections per upstream host kept by the pool.
    public var upstreamMaxConnections = 256
    public var shutdownGrace: Duration = .seconds(30)
    public var logLevel: Logger.Level = .info
    /// Origins allowed to call `/v1/*` from a browser; `["*"]` allows any; empty sends no CORS headers.
    public var corsAllowOrigins: [String] = []
    public var quotaDatabasePath = "quota.db"
    public var quotasJSON: String?
    public var quotasJSONPath = "quotas.json"
    /// Days the per-request usage log keeps its rows.
    public var usageLogRetentionDays = 90
    public var splunk = Splunk()

    public struct Splunk: Sendable {
        public var url: UpstreamURL?
        public var token: String?
        public var source = "oai-to-circuit"
        public var sourcetype = "llm:usage"
        public var index = "main"
        public var verifyTLS = true
        /// Sent as `X-Splunk-Request-Channel` when set (a GUID, as Splunk requires).
        public var channel: String?
        public var batchMaxEvents = 500
        public var batchMaxBytes = 1 << 20
        /// The longest an event waits before its batch is sent.
        public var flushInterval: Duration = .seconds(1)
        public var gzip = true
        public var timeout: Duration = .seconds(5)
        /// Events kept for delivery at most; past it new events are dropped and counted.
        public var spoolMaxEvents = 1_000_000
        public var isEnabled: Bool { url != nil && token != nil }
        public init() {}

        /// Where events go: `SPLUNK_HEC_URL`, with `/services/collector/event` when it names no path.
        public var eventURL: String? {
            guard let url else { return nil }
            let path = URLComponents(string: url.string)?.path ?? ""
            return path.isEmpty || path == "/" ? url.appending(path: "/services/collector/event") : url.string
        }
    }

    public init() {
        self.circuitBase = UpstreamURL(validating: "https://chat-ai.cisco.com")!
        self.tokenURL = UpstreamURL(validating: "https://id.cisco.com/oauth2/default/v1/token")!
    }

    /// Reads the environment; `environment` is the process environment merged with `--env-file`
    /// (the process environment winning).
    public init(environment: [String: String], listener: Listener = Listener()) throws {
        self.init()
        let env = EnvironmentReader(environment)
        self.listener = listener
        if let id = env["CIRCUIT_CLIENT_ID"], let secret = env["CIRCUIT_CLIENT_SECRET"] {
            self.credentials = ClientCredentials(clientID: id, clientSecret: secret)
        }
        self.appKey = env["CIRCUIT_APPKEY"] ?? ""
        if let base = try env.url("CIRCUIT_BASE") { self.circuitBase = base }
        if let url = try env.url("TOKEN_URL") { self.tokenURL = url }
        if let version = env["API_VERSION"] {
            guard version.utf8.allSatisfy({ Self.isUnreserved($0) }) else {
                throw ConfigurationError("API_VERSION", "may hold only letters, digits, '-', '.', '_' and '~'")
            }
            self.apiVersion = version
        }
        if let list = env["CIRCUIT_MODELS"] {
            let models = list.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            guard !models.isEmpty else { throw ConfigurationError("CIRCUIT_MODELS", "lists no model") }
            for model in models where ModelName.validate(model) != nil {
                throw ConfigurationError("CIRCUIT_MODELS", "'\(model)' is not a valid model name")
            }
            var seen = Set<String>()
            self.models = models.filter { seen.insert($0).inserted }
        }
        if let require = try env.bool("REQUIRE_SUBKEY") { self.requireSubkey = require }
        if let bytes = try env.integer("MAX_REQUEST_BYTES", in: 1...(1 << 30)) { self.maxRequestBytes = bytes }
        if let timeout = try env.seconds("UPSTREAM_TIMEOUT_SECONDS") { self.upstreamTimeout = timeout }
        if let connections = try env.integer("UPSTREAM_MAX_CONNECTIONS", in: 1...100_000) {
            self.upstreamMaxConnections = connections
        }
        if let grace = try env.seconds("SHUTDOWN_GRACE_SECONDS", allowZero: true) { self.shutdownGrace = grace }
        if let level = env["LOG_LEVEL"] {
            guard let parsed = Self.logLevel(named: level) else {
                throw ConfigurationError("LOG_LEVEL", "must be one of trace, debug, info, notice, warning, error, critical")
            }
            self.logLevel = parsed
        }
        if let origins = env["CORS_ALLOW_ORIGINS"] {
            self.corsAllowOrigins = origins.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
                .filter { !$0.isEmpty }
        }
        if let path = env["QUOTA_DB_PATH"] { self.quotaDatabasePath = path }
        if let inline = env["QUOTAS_JSON"] {
            do {
                _ = try QuotaPolicy.parse(Array(inline.utf8), source: "QUOTAS_JSON")
            } catch {
                throw ConfigurationError("QUOTAS_JSON", String(error.message.dropFirst("QUOTAS_JSON: ".count)))
            }
            self.quotasJSON = inline
        }
        if let path = env["QUOTAS_JSON_PATH"] { self.quotasJSONPath = path }
        if let days = try env.integer("USAGE_LOG_RETENTION_DAYS", in: 1...36_500) { self.usageLogRetentionDays = days }
        self.splunk.url = try env.url("SPLUNK_HEC_URL")
        if let token = env["SPLUNK_HEC_TOKEN"] {
            // It goes into a header: a character a header cannot carry would fail every request, and the HTTP
            // client's error would quote it. The value is never echoed.
            guard token.utf8.allSatisfy({ (0x21...0x7E).contains($0) }) else {
                throw ConfigurationError("SPLUNK_HEC_TOKEN", "must be printable ASCII without spaces (a Splunk token is a GUID)")
            }
            self.splunk.token = token
        }
        if let source = env["SPLUNK_SOURCE"] { self.splunk.source = source }
        if let sourcetype = env["SPLUNK_SOURCETYPE"] { self.splunk.sourcetype = sourcetype }
        if let index = env["SPLUNK_INDEX"] { self.splunk.index = index }
        if let verify = try env.bool("SPLUNK_VERIFY_SSL") { self.splunk.verifyTLS = verify }
        if let channel = env["SPLUNK_HEC_CHANNEL"] {
            guard UUID(uuidString: channel) != nil else {
                throw ConfigurationError("SPLUNK_HEC_CHANNEL", "must be a GUID such as 0C9A5C5E-8E4B-4B7A-9F8B-2B5C3D7E1A4F")
            }
            self.splunk.channel = channel
        }
        if let events = try env.integer("SPLUNK_BATCH_MAX_EVENTS", in: 1...100_000) { self.splunk.batchMaxEvents = events }
        if let bytes = try env.integer("SPLUNK_BATCH_MAX_BYTES", in: 1024...(64 << 20)) { self.splunk.batchMaxBytes = bytes }
        if let interval = try env.integer("SPLUNK_FLUSH_INTERVAL_MS", in: 1...600_000) {
            self.splunk.flushInterval = .milliseconds(interval)
        }
        if let gzip = try env.bool("SPLUNK_HEC_GZIP") { self.splunk.gzip = gzip }
        if let timeout = try env.seconds("SPLUNK_HEC_TIMEOUT_SECONDS") { self.splunk.timeout = timeout }
        if let spool = try env.integer("SPLUNK_SPOOL_MAX_EVENTS", in: 1000...1_000_000_000) {
            self.splunk.spoolMaxEvents = spool
        }
    }

    /// The swift-log level for a `LOG_LEVEL` value; accepts the earlier bridge's Python names too.
    public static func logLevel(named name: String) -> Logger.Level? {
        switch name.trimmingCharacters(in: .whitespaces).lowercased() {
        case "trace": .trace
        case "debug": .debug
        case "info": .info
        case "notice": .notice
        case "warning", "warn": .warning
        case "error": .error
        case "critical", "fatal": .critical
        default: nil
        }
    }

    static func isUnreserved(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
            UInt8(ascii: "~"):
            true
        default: false
        }
    }
}

/// OAuth2 client-credentials pair. Its description never shows the secret.
public struct ClientCredentials: Sendable, CustomStringConvertible {
    public var clientID: String
    public var clientSecret: String
    public init(clientID: String, clientSecret: String) {
        self.clientID = clientID
        self.clientSecret = clientSecret
    }
    public var description: String { "ClientCredentials(clientID: \(clientID), clientSecret: <redacted>)" }
}

/// Typed access to environment values with the contract's rules: empty means unset, every
/// malformed value is a `ConfigurationError` naming the variable.
struct EnvironmentReader {
    let values: [String: String]
    init(_ values: [String: String]) { self.values = values }

    subscript(name: String) -> String? {
        guard let value = values[name]?.trimmingCharacters(in: .whitespacesAndNewlines), !value.isEmpty else { return nil }
        return value
    }

    func bool(_ name: String) throws -> Bool? {
        guard let value = self[name] else { return nil }
        switch value.lowercased() {
        case "1", "true", "yes", "on": return true
        case "0", "false", "no", "off": return false
        default: throw ConfigurationError(name, "must be a boolean (1/0, true/false, yes/no, on/off), got '\(value)'")
        }
    }

    func integer(_ name: String, in range: ClosedRange<Int>) throws -> Int? {
        guard let value = self[name] else { return nil }
        guard let number = Int(value), range.contains(number) else {
            throw ConfigurationError(
                name,
                "must be a whole number from \(range.lowerBound) to \(range.upperBound), got '\(value)'"
            )
        }
        return number
    }

    func seconds(_ name: String, allowZero: Bool = false) throws -> Duration? {
        guard let value = self[name] else { return nil }
        guard let number = Double(value), number.isFinite, allowZero ? number >= 0 : number > 0, number <= 86_400 * 7 else {
            throw ConfigurationError(
                name,
                "must be a number of seconds\(allowZero ? "" : " above 0") and at most a week, got '\(value)'"
            )
        }
        return .milliseconds(Int64((number * 1000).rounded()))
    }

    func url(_ name: String) throws -> UpstreamURL? {
        guard let value = self[name] else { return nil }
        guard let url = UpstreamURL(validating: value) else {
            // The value is not echoed: a mistyped URL may carry a password or a token.
            throw ConfigurationError(name, "must be an http:// or https:// URL with a host and no query, user or password")
        }
        return url
    }
}
