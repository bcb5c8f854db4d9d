import AsyncHTTPClient
import CircuitFakes
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOSSL
import ServiceLifecycle
import Testing

@testable import OAIToCircuit

/// A running bridge on ephemeral loopback ports, wired to a fake Circuit and a fake token endpoint, with a
/// recording usage recorder, a log capture and a clock the test can move.
struct Harness {
    let tokens: FakeTokenEndpoint
    let circuit: FakeCircuit
    let bridge: Bridge
    /// The quota enforcer, ledger writer, store and policy reloader behind `bridge`.
    let assembly: BridgeServer.Assembly
    /// A fresh directory for this harness (the ledger database lives here unless the test says otherwise).
    let directory: URL
    let recorder: RecordingRecorder
    let logs: LogCapture
    let clock: ManualClock
    let client: HTTPClient
    let httpPort: Int?
    let httpsPort: Int?
    let group: ServiceGroup

    var baseURL: String { "http://127.0.0.1:\(httpPort!)" }
    var httpsURL: String { "https://127.0.0.1:\(httpsPort!)" }

    static let subkey = "sk-team-member-0123456789"

    /// The environment a test starts from; `overrides` replace it, and an empty value removes a variable. Unless
    /// the test names a policy, `QUOTAS_JSON` authorises `Harness.subkey` without limits.
    static func environment(
        tokens: FakeTokenEndpoint,
        circuit: FakeCircuit,
        directory: URL,
        overrides: [String: String]
    ) -> [String: String] {
        var environment = [
            "CIRCUIT_CLIENT_ID": "client-id", "CIRCUIT_CLIENT_SECRET": "client-secret", "CIRCUIT_APPKEY": "test-appkey",
            "CIRCUIT_BASE": circuit.baseURL, "TOKEN_URL": tokens.url, "UPSTREAM_TIMEOUT_SECONDS": "5",
            "QUOTA_DB_PATH": directory.appendingPathComponent("quota.db").path,
            "QUOTAS_JSON_PATH": directory.appendingPathComponent("quotas.json").path,
        ]
        if overrides["QUOTAS_JSON"] == nil, overrides["QUOTAS_JSON_PATH"] == nil {
            environment["QUOTAS_JSON"] = #"{"\#(subkey)": {}}"#
        }
        for (name, value) in overrides { environment[name] = value }
        return environment
    }

    /// Variables that send Splunk events to `hec`, flushed every 50 ms unless the test says otherwise.
    static func splunk(_ hec: FakeHEC, token: String = "hec-token", flushMilliseconds: Int = 50) -> [String: String] {
        ["SPLUNK_HEC_URL": hec.url, "SPLUNK_HEC_TOKEN": token, "SPLUNK_FLUSH_INTERVAL_MS": String(flushMilliseconds)]
    }

    /// Quick retries, so tests of failing deliveries take moments.
    static let quickRetries: @Sendable (inout HECShipper.Tuning) -> Void = { tuning in
        tuning.firstRetry = .milliseconds(50)
        tuning.pauseInterval = .milliseconds(200)
    }

    /// A new empty directory under the system's temporary one.
    static func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("oai-to-circuit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Runs `body` against a fresh bridge, and shuts everything down on every path.
    static func with(
        environment overrides: [String: String] = [:],
        listener: BridgeConfiguration.Listener? = nil,
        circuitSettings: FakeCircuit.Settings = FakeCircuit.Settings(),
        tokenSettings: FakeTokenEndpoint.Settings = FakeTokenEndpoint.Settings(),
        trusting certificate: String? = nil,
        directory given: URL? = nil,
        policyPollInterval: Duration = .seconds(2),
        registry: (any KeyRegistry)? = nil,
        adjust: (inout BridgeConfiguration) -> Void = { _ in },
        hecTuning: (inout HECShipper.Tuning) -> Void = Harness.quickRetries,
        configure: (inout Bridge) -> Void = { _ in },
        connectionIdleTimeout: TimeAmount = BridgeServer.connectionIdleTimeout,
        _ body: (Harness) async throws -> Void
    ) async throws {
        let directory = try given ?? temporaryDirectory()
        defer { if given == nil { try? FileManager.default.removeItem(at: directory) } }
        let tokens = try await FakeTokenEndpoint.start(tokenSettings)
        let circuit = try await FakeCircuit.start(tokens: tokens, settings: circuitSettings)
        var clientConfiguration = HTTPClient.Configuration()
        if let certificate {
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(certificate))
            clientConfiguration.tlsConfiguration = tls
        }
        clientConfiguration.timeout = .init(connect: .seconds(5), read: .seconds(30))
        // Enough connections that concurrent tests really are concurrent at the bridge (the default is 8).
        clientConfiguration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = 128
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: clientConfiguration)
        var upstream: HTTPClient?
        var assembled: BridgeServer.Assembly?
        do {
            var defaultListener = BridgeConfiguration.Listener()
            defaultListener.host = "127.0.0.1"
            defaultListener.port = 0
            defaultListener.sslPort = 0
            var configuration = try BridgeConfiguration(
                environment: environment(tokens: tokens, circuit: circuit, directory: directory, overrides: overrides),
                listener: listener ?? defaultListener
            )
            adjust(&configuration)
            let logs = LogCapture()
            let logger = logs.logger()
            let clock = ManualClock()
            let httpClient = BridgeServer.makeHTTPClient(configuration)
            upstream = httpClient
            let assembly = try await BridgeServer.assemble(
                configuration: configuration,
                httpClient: httpClient,
                clock: clock.bridgeClock,
                policyPollInterval: policyPollInterval,
                registry: registry,
                hecTuning: hecTuning,
                logger: logger
            )
            assembled = assembly
            var bridge = assembly.bridge
            let recorder = RecordingRecorder(forwardingTo: bridge.recorder)
            bridge.recorder = recorder
            configure(&bridge)
            let (ports, portSource) = AsyncStream<(BridgeServer.Scheme, Int)>.makeStream()
            let services = try BridgeServer.listeners(for: bridge, idleTimeout: connectionIdleTimeout) { scheme, port in
                portSource.yield((scheme, port))
            }
            let group = ServiceGroup(
                configuration: .init(
                    services: [assembly.shipper].compactMap { $0 } + [assembly.writer, assembly.reloader, services],
                    gracefulShutdownSignals: [],
                    logger: logger
                )
            )
            // If a listener cannot bind, the group ends: finishing the port stream then keeps the wait below from hanging.
            async let running: Void = {
                defer { portSource.finish() }
                try await group.run()
            }()
            var httpPort: Int?
            var httpsPort: Int?
            for await (scheme, port) in ports.prefix(services.count) {
                if scheme == .http { httpPort = port } else { httpsPort = port }
            }
            guard [httpPort, httpsPort].compactMap({ $0 }).count == services.count else {
                try await running
                throw HarnessError.listenersDidNotStart
            }
            let harness = Harness(
                tokens: tokens,
                circuit: circuit,
                bridge: bridge,
                assembly: assembly,
                directory: directory,
                recorder: recorder,
                logs: logs,
                clock: clock,
                client: client,
                httpPort: httpPort,
                httpsPort: httpsPort,
                group: group
            )
            // The test client goes first, so the server has no idle keep-alive connection left to wind down.
            do {
                try await body(harness)
            } catch {
                try? await client.shutdown()
                await group.triggerGracefulShutdown()
                try? await running
                throw error
            }
            try? await client.shutdown()
            await group.triggerGracefulShutdown()
            try await running
        } catch {
            await assembled?.close()
            try? await upstream?.shutdown()
            try? await client.shutdown()
            await circuit.stop()
            await tokens.stop()
            throw error
        }
        await assembled?.close()
        try await upstream?.shutdown()
        await circuit.stop()
        await tokens.stop()
    }

    // MARK: Requests

    struct Answer {
        var status: Int
        var headers: HTTPHeaders
        var body: String
        var json: [String: Any]? { Harness.json(body) }
        var error: [String: Any]? { json?["error"] as? [String: Any] }
    }

    func request(
        _ method: HTTPMethod = .POST,
        _ path: String,
        body: String? = nil,
        subkey: String? = Harness.subkey,
        headers: [(String, String)] = [],
        https: Bool = false
    ) async throws -> Answer {
        var request = HTTPClientRequest(url: (https ? httpsURL : baseURL) + path)
        request.method = method
        if let subkey { request.headers.add(name: "Authorization", value: "Bearer \(subkey)") }
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        if let body {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(string: body))
        }
        let response = try await client.execute(request, timeout: .seconds(30))
        let bytes = try await response.body.collect(upTo: 64 << 20)
        return Answer(status: Int(response.status.code), headers: response.headers, body: String(buffer: bytes))
    }

    /// A chat request to read as a stream (with `client.execute`), rather than collected whole.
    func chatRequest(_ body: String, https: Bool = false) -> HTTPClientRequest {
        var request = HTTPClientRequest(url: (https ? httpsURL : baseURL) + "/v1/chat/completions")
        request.method = .POST
        request.headers.add(name: "Authorization", value: "Bearer \(Harness.subkey)")
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(string: body))
        return request
    }

    func chat(_ body: String, subkey: String? = Harness.subkey, headers: [(String, String)] = []) async throws -> Answer {
        try await request(.POST, "/v1/chat/completions", body: body, subkey: subkey, headers: headers)
    }

    /// `text` parsed as a JSON object, else `nil`.
    static func json(_ text: String) -> [String: Any]? {
        (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any]
    }

    static func chatBody(model: String = "gpt-4o", stream: Bool = false, extra: String = "") -> String {
        #"{"model": "\#(model)", "messages": [{"role": "user", "content": "hi"}]\#(stream ? #", "stream": true"# : "")\#(extra)}"#
    }
}

enum HarnessError: Error {
    case listenersDidNotStart
}

/// Asserts the bridge's own error shape: status, `error.code`, `error.message`, `error.type` and `detail`.
func expectError(
    _ answer: Harness.Answer,
    status: Int,
    code: String,
    message: String? = nil,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(answer.status == status, "body: \(answer.body)", sourceLocation: sourceLocation)
    let error = answer.error
    #expect(error?["code"] as? String == code, "body: \(answer.body)", sourceLocation: sourceLocation)
    let actual = error?["message"] as? String
    if let message { #expect(actual == message, sourceLocation: sourceLocation) }
    #expect(answer.json?["detail"] as? String == actual, sourceLocation: sourceLocation)
    #expect(
        error?["type"] as? String == BridgeError(status: .init(code: status), code: code, message: "").type,
        sourceLocation: sourceLocation
    )
    #expect(answer.headers.first(name: "content-type") == "application/json", sourceLocation: sourceLocation)
}

/// A clock that starts at the real time and moves only when told.
final class ManualClock: Sendable {
    private let offset = NIOLockedValueBox<Double>(0)
    private let start = Date().timeIntervalSince1970

    var bridgeClock: BridgeClock {
        BridgeClock { [self] in start + offset.withLockedValue { $0 } }
    }

    func advance(by seconds: Double) { offset.withLockedValue { $0 += seconds } }
}

/// Keeps what the bridge accounts (after the real recorder has committed it), so tests can wait for a record
/// instead of sleeping.
final class RecordingRecorder: UsageRecorder {
    let usage = Journal<UsageRecord>()
    let refusals = Journal<RefusalRecord>()
    let next: (any UsageRecorder)?

    init(forwardingTo next: (any UsageRecorder)? = nil) { self.next = next }

    func record(_ usage: UsageRecord) async {
        await next?.record(usage)
        await self.usage.append(usage)
    }

    func record(_ refusal: RefusalRecord) async {
        await next?.record(refusal)
        await refusals.append(refusal)
    }
}

/// Every log line at every level, rendered with its metadata, so tests can search them for secrets.
final class LogCapture: Sendable {
    private let lines = NIOLockedValueBox<[String]>([])

    func logger() -> Logger {
        var logger = Logger(label: "test") { _ in Handler(capture: self) }
        logger.logLevel = .trace
        return logger
    }

    var all: [String] { lines.withLockedValue { $0 } }

    fileprivate func append(_ line: String) { lines.withLockedValue { $0.append(line) } }

    struct Handler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            var all = metadata
            if let extra = event.metadata { all.merge(extra) { $1 } }
            capture.append("\(event.level) \(event.message) \(all.map { "\($0)=\($1)" }.sorted().joined(separator: " "))")
        }
    }
}
