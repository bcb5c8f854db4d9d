import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

/// Assembles and runs the bridge: one shared `HTTPClient`, the HTTP and/or HTTPS listeners over one responder,
/// graceful shutdown on SIGTERM/SIGINT within `SHUTDOWN_GRACE_SECONDS`.
public enum BridgeServer {
    public enum Scheme: String, Sendable {
        case http
        case https
    }

    /// The client for Circuit's token endpoint (chat requests have their own pool: `CircuitClient`). `UPSTREAM_TIMEOUT_SECONDS` is its
    /// read timeout: the longest silence allowed while waiting for a response head or between two chunks.
    public static func makeHTTPClient(_ configuration: BridgeConfiguration) -> HTTPClient {
        var client = HTTPClient.Configuration()
        client.timeout = .init(connect: .seconds(10), read: TimeAmount(configuration.upstreamTimeout))
        client.connectionPool = .init(
            idleTimeout: .seconds(60),
            concurrentHTTP1ConnectionsPerHostSoftLimit: configuration.upstreamMaxConnections
        )
        // A refused or failed connection is answered 502 at once; retrying would hold every client until its
        // deadline while Circuit is down.
        client.connectionPool.retryConnectionEstablishment = false
        client.redirectConfiguration = .disallow
        client.decompression = .disabled
        return HTTPClient(eventLoopGroup: MultiThreadedEventLoopGroup.singleton, configuration: client)
    }

    /// The bridge's core with the given seams (defaults: every subkey passes, no limits, usage as debug lines).
    public static func makeBridge(
        configuration: BridgeConfiguration,
        httpClient: HTTPClient,
        clock: BridgeClock = .system,
        metrics: BridgeMetrics? = nil,
        circuitTLS: TLSConfiguration? = nil,
        logger: Logger
    ) throws -> Bridge {
        let metrics = metrics ?? BridgeMetrics(models: configuration.models)
        let tokens = TokenProvider(
            credentials: configuration.credentials,
            tokenURL: configuration.tokenURL,
            httpClient: httpClient,
            clock: clock,
            timeout: configuration.upstreamTimeout,
            metrics: metrics,
            logger: logger
        )
        let circuit = try CircuitClient(
            tokens: tokens,
            base: configuration.circuitBase,
            apiVersion: configuration.apiVersion,
            timeout: configuration.upstreamTimeout,
            maximumConnections: configuration.upstreamMaxConnections,
            tls: circuitTLS
        )
        return Bridge(
            configuration: configuration,
            circuit: circuit,
            recorder: LoggingUsageRecorder(logger: logger),
            metrics: metrics,
            clock: clock,
            logger: logger
        )
    }

    /// The whole bridge: the core, the quota policy (a bad one is a configuration error naming the variable), the
    /// ledger (opened and migrated; its counters loaded), and the policy reloader that runs beside the listeners.
    public struct Assembly: Sendable {
        public var bridge: Bridge
        public var enforcer: QuotaEnforcer
        public var writer: LedgerWriter
        public var reloader: PolicyReloader
        public var store: any LedgerStore
        /// Set when Splunk delivery is on (`SPLUNK_HEC_URL` and `SPLUNK_HEC_TOKEN`).
        public var shipper: HECShipper?
        /// The keys registry read from the database (unless a test gave its own).
        public var keys: LiveKeyRegistry?

        /// Writes what a failing database left behind and closes it (after the listeners have stopped).
        public func close() async {
            await writer.flush()
            try? await store.close()
            await bridge.circuit.shutdown()
            await shipper?.client.shutdown()
        }
    }

    public static func assemble(
        configuration: BridgeConfiguration,
        httpClient: HTTPClient,
        clock: BridgeClock = .system,
        policyPollInterval: Duration = .seconds(2),
        registry: (any KeyRegistry)? = nil,
        hecTuning: (inout HECShipper.Tuning) -> Void = { _ in },
        circuitTLS: TLSConfiguration? = nil,
        logger: Logger
    ) async throws -> Assembly {
        let source = PolicySource(configuration)
        let stamp = source.stamp
        let policy: QuotaPolicy
        do {
            policy = try source.load()
        } catch {
            throw ConfigurationError(source.variable, error.message)
        }
        let store: SQLiteLedger
        do {
            store = try SQLiteLedger.open(path: configuration.quotaDatabasePath)
        } catch {
            throw StartupError(
                "cannot open the usage database \(configuration.quotaDatabasePath) (QUOTA_DB_PATH): "
                    + LedgerWriter.describe(error)
            )
        }
        var keys: LiveKeyRegistry?
        let today = PeriodCalendar.day(clock.now())
        let snapshot: LedgerSnapshot
        let directory: KeyDirectory
        let outbox: OutboxCounts
        do {
            if registry == nil {
                let bell = KeyChangeBell(databasePath: store.location, create: true)
                if bell == nil {
                    logger.warning(
                        "cannot open the key-change bell beside the database; key changes take effect within seconds",
                        metadata: ["path": "\(KeyChangeBell.path(forDatabase: store.location))"]
                    )
                }
                let live = try await LiveKeyRegistry(source: store, bell: bell, clock: clock, logger: logger)
                live.bellPath = KeyChangeBell.path(forDatabase: store.location)
                // Rows that requests in flight during a `keys import` wrote under the imported keys' old names.
                if !live.aliases.isEmpty { _ = try await store.foldImportedKeys(live.contents, now: clock.now()) }
                keys = live
            }
            snapshot = try await store.snapshot(
                day: PeriodCalendar.dayString(today),
                month: PeriodCalendar.monthString(PeriodCalendar.month(ofDay: today))
            )
            directory = try await store.directory()
            outbox = try await store.outboxCounts()
        } catch {
            try? await store.close()
            throw StartupError("cannot read the usage database \(store.location): " + LedgerWriter.describe(error))
        }
        // A key whose template the policy lacks refuses every model (its limits are unknown); the others serve.
        if let keys, let problem = PolicyReloader.missingTemplates(in: policy, usedBy: keys) {
            logger.warning("quota policy: \(problem)")
        }
        let enforcer = QuotaEnforcer(policy: policy, directory: directory, registry: registry ?? keys, clock: clock)
        enforcer.load(snapshot)
        keys?.onImport(
            adopt: { aliases in enforcer.adopt(aliases: aliases) },
            fold: { [store] contents in
                do {
                    _ = try await store.foldImportedKeys(contents, now: clock.now())
                } catch {
                    logger.error(
                        "could not move imported keys' usage to their ids",
                        metadata: ["error": "\(LedgerWriter.describe(error))"]
                    )
                }
            }
        )
        let metrics = BridgeMetrics(models: configuration.models)
        var spool: SplunkSpool?
        var shipper: HECShipper?
        if let client = HECClient(configuration.splunk) {
            let splunk = configuration.splunk
            let made = SplunkSpool(maximumEvents: splunk.spoolMaxEvents, batchSize: splunk.batchMaxEvents)
            made.load(outbox)
            var tuning = HECShipper.Tuning(splunk, drainLimit: configuration.shutdownGrace)
            hecTuning(&tuning)
            spool = made
            shipper = HECShipper(
                client: client,
                outbox: store,
                spool: made,
                envelope: SplunkEnvelope(splunk),
                tuning: tuning,
                initial: outbox,
                clock: clock,
                metrics: metrics,
                logger: logger
            )
        } else if outbox.pending > 0 {
            logger.notice(
                "Splunk events wait in the database; set SPLUNK_HEC_URL and SPLUNK_HEC_TOKEN to send them",
                metadata: ["events": "\(outbox.pending)"]
            )
        }
        let writer = LedgerWriter(
            store: store,
            retentionDays: configuration.usageLogRetentionDays,
            clock: clock,
            logger: logger,
            metrics: metrics,
            spool: spool
        )
        let reloader = PolicyReloader(
            source: source,
            stamp: stamp,
            enforcer: enforcer,
            store: store,
            keys: keys,
            pollInterval: policyPollInterval,
            clock: clock,
            logger: logger
        )
        var bridge = try makeBridge(
            configuration: configuration,
            httpClient: httpClient,
            clock: clock,
            metrics: metrics,
            circuitTLS: circuitTLS,
            logger: logger
        )
        bridge.authorizer = enforcer
        bridge.policy = enforcer
        bridge.recorder = LedgerRecorder(enforcer: enforcer, writer: writer, logger: logger)
        bridge.health = { [writer, reloader, shipper, spool, keys] in
            HealthReport.of(
                ledger: writer.health,
                location: store.location,
                policy: reloader.status,
                managedKeys: keys?.activeCount,
                splunk: shipper.flatMap { shipper in spool.map { (shipper.status, $0.counts) } }
            )
        }
        return Assembly(
            bridge: bridge,
            enforcer: enforcer,
            writer: writer,
            reloader: reloader,
            store: store,
            shipper: shipper,
            keys: keys
        )
    }

    /// How long a connection may stay silent between requests (or while a request is read) before it is closed.
    public static let connectionIdleTimeout = TimeAmount.seconds(120)

    /// The listeners the configuration asks for (HTTP, HTTPS or both) over one responder, as one service, so that
    /// graceful shutdown stops them accepting at the same moment.
    /// `onListening` is told each listener's scheme and bound port (useful with port 0).
    public static func listeners(
        for bridge: Bridge,
        idleTimeout: TimeAmount = connectionIdleTimeout,
        onListening: @escaping @Sendable (Scheme, Int) async -> Void = { _, _ in }
    ) throws -> Listeners {
        let listener = bridge.configuration.listener
        let responder = BridgeResponder(bridge: bridge)
        var servers: [(Scheme, HTTPListener)] = []
        func add(_ scheme: Scheme, port: Int, tls: NIOSSLContext?) {
            let server = HTTPListener(
                host: listener.host,
                port: port,
                tls: tls,
                responder: responder,
                bodyLimit: bridge.configuration.maxRequestBytes,
                idleTimeout: idleTimeout,
                logger: bridge.logger
            )
            servers.append((scheme, server))
        }
        if listener.tls != .only { add(.http, port: listener.port, tls: nil) }
        if listener.tls != .off {
            let tls = try tlsConfiguration(certificate: listener.certificatePath, privateKey: listener.privateKeyPath)
            add(.https, port: listener.sslPort, tls: try NIOSSLContext(configuration: tls))
        }
        return Listeners(servers: servers, onListening: onListening)
    }

    /// The bridge's HTTP and HTTPS servers, run side by side. Each inherits the group's graceful-shutdown signal,
    /// so both stop accepting together; if one fails, the other is cancelled.
    public struct Listeners: Service, CustomStringConvertible {
        let servers: [(Scheme, HTTPListener)]
        let onListening: @Sendable (Scheme, Int) async -> Void

        public var count: Int { servers.count }

        /// How the service group names it in its log (never the configuration, which holds secrets).
        public var description: String {
            "Listeners(" + servers.map { "\($0.0.rawValue) \($0.1.host):\($0.1.port)" }.joined(separator: ", ") + ")"
        }

        public func run() async throws {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (scheme, server) in servers {
                    group.addTask { try await server.run { port in await onListening(scheme, port) } }
                }
                try await group.waitForAll()
            }
        }
    }

    /// Loads the PEM certificate chain and key, with errors that name the file and how to make one.
    static func tlsConfiguration(certificate: String, privateKey: String) throws -> TLSConfiguration {
        let hint = "create one with `oai-to-circuit cert generate`"
        guard FileManager.default.isReadableFile(atPath: certificate) else {
            throw ConfigurationError("--cert", "cannot read the certificate file \(certificate); \(hint)")
        }
        guard FileManager.default.isReadableFile(atPath: privateKey) else {
            throw ConfigurationError("--key", "cannot read the private key file \(privateKey); \(hint)")
        }
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificate)
        } catch {
            throw ConfigurationError("--cert", "\(certificate) does not hold a PEM certificate; \(hint)")
        }
        guard !chain.isEmpty else {
            throw ConfigurationError("--cert", "\(certificate) does not hold a PEM certificate; \(hint)")
        }
        let key: NIOSSLPrivateKey
        do {
            key = try NIOSSLPrivateKey(file: privateKey, format: .pem)
        } catch {
            throw ConfigurationError("--key", "\(privateKey) does not hold a PEM private key; \(hint)")
        }
        return TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) },
            privateKey: .privateKey(key)
        )
    }

    /// `oai-to-circuit serve`: runs until SIGTERM or SIGINT, then stops accepting, lets in-flight requests and
    /// streams finish within the grace period, and shuts the HTTP client down.
    public static func run(configuration: BridgeConfiguration, logger: Logger) async throws {
        let httpClient = makeHTTPClient(configuration)
        let assembly: Assembly
        do {
            assembly = try await assemble(configuration: configuration, httpClient: httpClient, logger: logger)
        } catch {
            try? await httpClient.shutdown()
            throw error
        }
        do {
            let notifier = SystemdNotifier(shutdownGrace: configuration.shutdownGrace, logger: logger)
            let listening = Mutex<[String]>([])
            let expected = configuration.listener.tls == .both ? 2 : 1
            let services = try listeners(for: assembly.bridge) { scheme, port in
                logger.notice(
                    "listening",
                    metadata: ["scheme": "\(scheme.rawValue)", "host": "\(configuration.listener.host)", "port": "\(port)"]
                )
                let all = listening.withLock { ports in
                    ports.append("\(scheme.rawValue) \(configuration.listener.host):\(port)")
                    return ports.count == expected ? ports : nil
                }
                if let all { notifier.ready(status: "listening on " + all.joined(separator: ", ")) }
            }
            announce(configuration, assembly: assembly, logger: logger)
            // Shutdown runs in reverse: the listeners stop (finishing in-flight requests, which still commit to the
            // ledger) before the reloader and the writer; the Splunk shipper goes last, sending what they left.
            var members: [ServiceGroupConfiguration.ServiceConfiguration] = []
            if let shipper = assembly.shipper { members.append(.init(service: shipper)) }
            members += [.init(service: assembly.writer), .init(service: assembly.reloader), .init(service: services)]
            // Last, so it hears the signal first: the shipper's drain must end within the same grace period.
            if let shipper = assembly.shipper { members.append(.init(service: HECShipper.ShutdownWatch(shipper: shipper))) }
            // Last of all, so systemd hears STOPPING=1 the moment shutdown begins.
            members.append(.init(service: notifier))
            var group = ServiceGroupConfiguration(
                services: members,
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger
            )
            group.maximumGracefulShutdownDuration = configuration.shutdownGrace
            group.maximumCancellationDuration = .seconds(5)
            try await ServiceGroup(configuration: group).run()
        } catch {
            await assembly.close()
            try? await httpClient.shutdown()
            throw error
        }
        await assembly.close()
        try await httpClient.shutdown()
        logger.notice("stopped")
    }

    private static func announce(_ configuration: BridgeConfiguration, assembly: Assembly, logger: Logger) {
        if configuration.credentials == nil {
            logger.warning("CIRCUIT_CLIENT_ID and CIRCUIT_CLIENT_SECRET are not set: chat requests will answer 502")
        }
        if configuration.appKey.isEmpty {
            logger.warning("CIRCUIT_APPKEY is not set: Circuit may refuse requests")
        }
        if !configuration.requireSubkey {
            logger.warning("REQUIRE_SUBKEY is off: requests without a subkey are served anonymously")
        }
        let policy = assembly.reloader.status
        if !policy.fileExists {
            logger.warning(
                "no quota policy file: no subkey is authorised until it exists (it is picked up when it appears)",
                metadata: ["path": "\(policy.source)"]
            )
        } else {
            logger.notice("quota policy loaded", metadata: ["source": "\(policy.source)", "subkeys": "\(policy.subkeys)"])
        }
        if let keys = assembly.keys {
            logger.notice("keys registry loaded", metadata: ["active_keys": "\(keys.activeCount)"])
        }
        for warning in assembly.enforcer.policy.warnings {
            logger.warning("quota policy: \(warning)")
        }
        logger.info(
            "oai-to-circuit starting",
            metadata: [
                "version": "\(BridgeVersion.current)", "circuit": "\(configuration.circuitBase)",
                "token_url": "\(configuration.tokenURL)", "models": "\(configuration.models.joined(separator: ","))",
                "database": "\(assembly.store.location)",
                "splunk_hec": "\(configuration.splunk.isEnabled ? configuration.splunk.eventURL ?? "" : "off")",
            ]
        )
    }
}

/// A start-up failure other than configuration (exit 1), with a message fit for the log.
public struct StartupError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
