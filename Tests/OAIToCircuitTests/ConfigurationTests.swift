import Foundation
import Logging
import Testing

@testable import OAIToCircuit

@Suite(.timeLimit(.minutes(1))) struct ConfigurationTests {
    @Test func defaults() throws {
        let configuration = try BridgeConfiguration(environment: [:])
        #expect(configuration.credentials == nil)
        #expect(configuration.circuitBase.string == "https://chat-ai.cisco.com")
        #expect(configuration.tokenURL.string == "https://id.cisco.com/oauth2/default/v1/token")
        #expect(configuration.apiVersion == "2025-04-01-preview")
        #expect(configuration.requireSubkey)
        #expect(configuration.maxRequestBytes == 16 * 1024 * 1024)
        #expect(configuration.upstreamTimeout == .seconds(90))
        #expect(configuration.shutdownGrace == .seconds(30))
        #expect(configuration.logLevel == .info)
        #expect(configuration.models == BridgeConfiguration.knownModels)
        #expect(configuration.quotaDatabasePath == "quota.db" && configuration.quotasJSONPath == "quotas.json")
        #expect(!configuration.splunk.isEnabled && configuration.splunk.index == "main")
        #expect(configuration.corsAllowOrigins.isEmpty)
    }

    @Test func emptyValuesAreUnset() throws {
        let configuration = try BridgeConfiguration(environment: [
            "SPLUNK_HEC_URL": "", "CIRCUIT_BASE": "", "REQUIRE_SUBKEY": "", "LOG_LEVEL": " ", "CIRCUIT_CLIENT_ID": "id",
            "CIRCUIT_CLIENT_SECRET": "",
        ])
        #expect(configuration.splunk.url == nil)
        #expect(configuration.circuitBase.string == "https://chat-ai.cisco.com")
        #expect(configuration.requireSubkey)
        #expect(configuration.logLevel == .info)
        #expect(configuration.credentials == nil)
    }

    @Test(arguments: [
        ("1", true), ("0", false), ("TRUE", true), ("False", false), ("yes", true), ("NO", false), ("On", true), ("off", false),
    ])
    func booleans(_ text: String, _ value: Bool) throws {
        #expect(try BridgeConfiguration(environment: ["REQUIRE_SUBKEY": text]).requireSubkey == value)
    }

    @Test(arguments: [
        ("REQUIRE_SUBKEY", "maybe"), ("SPLUNK_VERIFY_SSL", "2"), ("UPSTREAM_TIMEOUT_SECONDS", "abc"),
        ("UPSTREAM_TIMEOUT_SECONDS", "0"), ("UPSTREAM_TIMEOUT_SECONDS", "-1"), ("MAX_REQUEST_BYTES", "16MB"),
        ("MAX_REQUEST_BYTES", "0"), ("SHUTDOWN_GRACE_SECONDS", "soon"), ("LOG_LEVEL", "loud"), ("CIRCUIT_BASE", "ftp://x"),
        ("CIRCUIT_BASE", "not a url"), ("TOKEN_URL", "https://id.example/token?x=1"), ("SPLUNK_HEC_URL", "splunk:8088"),
        ("CIRCUIT_MODELS", "gpt-4o,../x"), ("CIRCUIT_MODELS", " , "), ("API_VERSION", "2025&x=1"),
        ("UPSTREAM_MAX_CONNECTIONS", "0"), ("USAGE_LOG_RETENTION_DAYS", "0"), ("SPLUNK_HEC_CHANNEL", "channel-1"),
        ("SPLUNK_BATCH_MAX_EVENTS", "0"), ("SPLUNK_BATCH_MAX_BYTES", "1"), ("SPLUNK_FLUSH_INTERVAL_MS", "soon"),
        ("SPLUNK_HEC_GZIP", "zip"), ("SPLUNK_HEC_TIMEOUT_SECONDS", "0"), ("SPLUNK_SPOOL_MAX_EVENTS", "10"),
        ("SPLUNK_HEC_TOKEN", "secret token"), ("SPLUNK_HEC_TOKEN", "secret\ntoken"),
    ])
    func invalidValuesNameTheVariable(_ name: String, _ value: String) {
        #expect {
            try BridgeConfiguration(environment: [name: value])
        } throws: { error in
            (error as? ConfigurationError)?.name == name
                && (error as? ConfigurationError)?.description.hasPrefix("invalid configuration: \(name): ") == true
                && (error as? ConfigurationError)?.description.contains("secret") == false
        }
    }

    @Test(arguments: [
        ("INFO", Logger.Level.info), ("DEBUG", .debug), ("WARNING", .warning), ("ERROR", .error), ("CRITICAL", .critical),
        ("trace", .trace), ("notice", .notice), ("Warning", .warning),
    ])
    func logLevels(_ text: String, _ level: Logger.Level) throws {
        #expect(try BridgeConfiguration(environment: ["LOG_LEVEL": text]).logLevel == level)
    }

    @Test func valuesAreRead() throws {
        let configuration = try BridgeConfiguration(environment: [
            "CIRCUIT_CLIENT_ID": "id", "CIRCUIT_CLIENT_SECRET": "secret", "CIRCUIT_BASE": "http://127.0.0.1:9/",
            "UPSTREAM_TIMEOUT_SECONDS": "2.5", "CIRCUIT_MODELS": "a, b", "CORS_ALLOW_ORIGINS": "https://x, https://y",
            "MAX_REQUEST_BYTES": "1024",
        ])
        #expect(configuration.credentials?.clientSecret == "secret")
        #expect(!"\(configuration.credentials!)".contains("secret)") && "\(configuration.credentials!)".contains("redacted"))
        #expect(configuration.circuitBase.string == "http://127.0.0.1:9")
        #expect(configuration.upstreamTimeout == .milliseconds(2500))
        #expect(configuration.models == ["a", "b"])
        #expect(configuration.corsAllowOrigins == ["https://x", "https://y"])
        #expect(configuration.maxRequestBytes == 1024)
    }

    @Test func environmentFile() throws {
        let values = try EnvironmentFile.parse(
            """
            # comment
            CIRCUIT_CLIENT_ID=abc

            export CIRCUIT_APPKEY="quoted value"
            SPLUNK_INDEX='single'
            LOG_LEVEL=DEBUG # trailing comment
            EMPTY=
            """
        )
        #expect(
            values == [
                "CIRCUIT_CLIENT_ID": "abc", "CIRCUIT_APPKEY": "quoted value", "SPLUNK_INDEX": "single", "LOG_LEVEL": "DEBUG",
                "EMPTY": "",
            ]
        )
        #expect(throws: ConfigurationError.self) { try EnvironmentFile.parse("JUST TEXT") }
        let escapes = try EnvironmentFile.parse(#"A="x\\ny"\#nB="q\"q"\#nC="C:\path"\#nD='raw\n'"#)
        #expect(escapes == ["A": #"x\ny"#, "B": #"q"q"#, "C": #"C:\path"#, "D": #"raw\n"#])
    }

    @Test func processEnvironmentWinsOverTheEnvFile() throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("env-\(UUID().uuidString)")
        try Data("CIRCUIT_APPKEY=from-file\nAPI_VERSION=2024-01-01\nREQUIRE_SUBKEY=no\n".utf8).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let command = try ServeCommand.parse(["--env-file", file.path, "--port", "8080", "--ssl"])
        let configuration = try command.makeConfiguration(processEnvironment: ["CIRCUIT_APPKEY": "from-process"])
        #expect(configuration.appKey == "from-process")
        #expect(configuration.apiVersion == "2024-01-01")
        #expect(!configuration.requireSubkey)
        #expect(configuration.listener.port == 8080 && configuration.listener.tls == .both)
        // An empty process value is unset (systemd writes `Environment="X="`): the file's value applies.
        let emptyWins = try command.makeConfiguration(processEnvironment: ["CIRCUIT_APPKEY": ""])
        #expect(emptyWins.appKey == "from-file")
    }

    @Test func inlineQuotasMustBeAValidPolicy() throws {
        #expect(try BridgeConfiguration(environment: ["QUOTAS_JSON": #"{"alice": {"*": {"requests": 5}}}"#]).quotasJSON != nil)
        let cases = [
            ("[1]", "must be a JSON object, not an array"), ("{", "not valid JSON"), ("alice", "not valid JSON"),
            (
                #"{"alice": {"*": {"requests": "5"}}}"#,
                "subkey entry #1 (\(Caller.hash("alice"))) → '*' → requests must be a whole number or null, not a string"
            ),
        ]
        for (bad, problem) in cases {
            #expect(throws: ConfigurationError("QUOTAS_JSON", problem)) {
                try BridgeConfiguration(environment: ["QUOTAS_JSON": bad])
            }
        }
    }

    @Test func rejectedURLsAreNotEchoed() {
        #expect {
            try BridgeConfiguration(environment: ["SPLUNK_HEC_URL": "https://user:hunter2@splunk.example/?token=abc"])
        } throws: { error in
            !"\(error)".contains("hunter2") && !"\(error)".contains("abc")
        }
    }

    @Test func flagsAreValidated() throws {
        for arguments in [["--port", "http"], ["--port", "70000"], ["--ssl-port=-1"], ["--env-file", "/nonexistent/env"]] {
            let command = try ServeCommand.parse(arguments)
            #expect(throws: ConfigurationError.self) { try command.makeConfiguration(processEnvironment: [:]) }
        }
        let defaults = try ServeCommand.parse(["--no-reload"]).makeConfiguration(processEnvironment: [:])
        #expect(defaults.listener == BridgeConfiguration.Listener())
        #expect(try ServeCommand.parse(["--ssl-only", "--ssl"]).makeConfiguration(processEnvironment: [:]).listener.tls == .only)
    }

    @Test func serveIsTheDefaultSubcommand() throws {
        let command = try OAIToCircuitCommand.parseAsRoot(["--port", "9999"])
        #expect((command as? ServeCommand)?.port == "9999")
    }

    @Test func theExampleEnvironmentFileIsAValidConfigurationWhoseShownDefaultsAreTheDefaults() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let example = root.appendingPathComponent("deploy/credentials.env.example")
        let values = try EnvironmentFile.load(path: example.path)
        let configuration = try BridgeConfiguration(environment: values)
        #expect(configuration.models == BridgeConfiguration.knownModels)
        // Uncommenting every setting shown with its default changes nothing (paths, inline policy and channel are
        // examples, not defaults).
        let examples = ["QUOTA_DB_PATH", "QUOTAS_JSON_PATH", "QUOTAS_JSON", "SPLUNK_HEC_CHANNEL"]
        let text = try String(contentsOf: example, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false)
            .map { line -> Substring in
                guard line.hasPrefix("# "), let equals = line.firstIndex(of: "="),
                    line.dropFirst(2)[..<equals].allSatisfy({ $0.isUppercase || $0 == "_" }),
                    !examples.contains(String(line.dropFirst(2)[..<equals]))
                else { return line }
                return line.dropFirst(2)
            }.joined(separator: "\n")
        let shown = try EnvironmentFile.parse(text)
        #expect(shown.count > values.count + 20)
        let defaults = try BridgeConfiguration(environment: [:])
        let explicit = try BridgeConfiguration(environment: shown)
        #expect(explicit.circuitBase == defaults.circuitBase && explicit.tokenURL == defaults.tokenURL)
        #expect(explicit.apiVersion == defaults.apiVersion && explicit.models == defaults.models)
        #expect(explicit.upstreamTimeout == defaults.upstreamTimeout)
        #expect(explicit.upstreamMaxConnections == defaults.upstreamMaxConnections)
        #expect(explicit.maxRequestBytes == defaults.maxRequestBytes && explicit.splunk.source == defaults.splunk.source)
        #expect(explicit.requireSubkey == defaults.requireSubkey && explicit.shutdownGrace == defaults.shutdownGrace)
        #expect(explicit.logLevel == defaults.logLevel && explicit.usageLogRetentionDays == defaults.usageLogRetentionDays)
        #expect(explicit.splunk.batchMaxEvents == defaults.splunk.batchMaxEvents)
        #expect(explicit.splunk.batchMaxBytes == defaults.splunk.batchMaxBytes)
        #expect(explicit.splunk.flushInterval == defaults.splunk.flushInterval && explicit.splunk.gzip == defaults.splunk.gzip)
        #expect(explicit.splunk.timeout == defaults.splunk.timeout)
        #expect(explicit.splunk.spoolMaxEvents == defaults.splunk.spoolMaxEvents)
        #expect(explicit.splunk.index == defaults.splunk.index && explicit.splunk.sourcetype == defaults.splunk.sourcetype)
    }

    @Test func splunkDeliverySettings() throws {
        let defaults = try BridgeConfiguration(environment: [:]).splunk
        #expect(!defaults.isEnabled && defaults.eventURL == nil)
        #expect(defaults.batchMaxEvents == 500 && defaults.batchMaxBytes == 1 << 20 && defaults.flushInterval == .seconds(1))
        #expect(
            defaults.gzip && defaults.timeout == .seconds(5) && defaults.spoolMaxEvents == 1_000_000 && defaults.channel == nil
        )
        let set = try BridgeConfiguration(environment: [
            "SPLUNK_HEC_URL": "https://splunk.example:8088", "SPLUNK_HEC_TOKEN": "t", "SPLUNK_BATCH_MAX_EVENTS": "50",
            "SPLUNK_BATCH_MAX_BYTES": "65536", "SPLUNK_FLUSH_INTERVAL_MS": "250", "SPLUNK_HEC_GZIP": "off",
            "SPLUNK_HEC_TIMEOUT_SECONDS": "2.5", "SPLUNK_SPOOL_MAX_EVENTS": "5000",
            "SPLUNK_HEC_CHANNEL": "0C9A5C5E-8E4B-4B7A-9F8B-2B5C3D7E1A4F",
        ]).splunk
        #expect(set.isEnabled && set.eventURL == "https://splunk.example:8088/services/collector/event")
        #expect(set.batchMaxEvents == 50 && set.batchMaxBytes == 65536 && set.flushInterval == .milliseconds(250))
        #expect(!set.gzip && set.timeout == .milliseconds(2500) && set.spoolMaxEvents == 5000)
        #expect(set.channel == "0C9A5C5E-8E4B-4B7A-9F8B-2B5C3D7E1A4F")
        // A URL with a path is used as it is.
        let path = try BridgeConfiguration(environment: ["SPLUNK_HEC_URL": "https://splunk.example/services/collector/"]).splunk
        #expect(path.eventURL == "https://splunk.example/services/collector")
    }
}
