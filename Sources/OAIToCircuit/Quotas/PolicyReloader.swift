import Logging
import ServiceLifecycle
import Synchronization
import UnixSignals

/// Reloads the quota policy on SIGHUP and when its file changes (checked every `pollInterval`), swapping the new
/// one in at once. A policy that does not parse or validate leaves the old one in force; the error is logged and
/// shown in `/health` until a good one loads. SIGHUP also re-reads the earlier bridge's key names and states and the
/// keys registry; each poll also compares the registry's version (a change whose key-change bell was not rung).
public final class PolicyReloader: Service, Sendable {
    public struct Status: Sendable {
        public var source: String
        public var subkeys: Int
        /// When the policy in force was loaded, seconds since 1970.
        public var loadedAt: Double
        /// Why the latest attempt was rejected; `nil` once a policy loads.
        public var error: String?
        /// Whether the policy file exists (a missing file is an empty policy).
        public var fileExists: Bool
    }

    /// What one reload attempt did, for tests and logs.
    public enum Outcome: Sendable, Equatable {
        case loaded(subkeys: Int)
        case rejected(String)
    }

    let source: PolicySource
    let enforcer: QuotaEnforcer
    let store: (any LedgerStore)?
    let keys: LiveKeyRegistry?
    let pollInterval: Duration
    let clock: BridgeClock
    let logger: Logger
    private let state: Mutex<(status: Status, stamp: FileStamp?)>
    /// Every attempt's outcome, newest kept if nobody listens.
    public let outcomes: AsyncStream<Outcome>
    private let outcomeSink: AsyncStream<Outcome>.Continuation

    /// `enforcer` already holds the policy loaded at start; `stamp` is the file as it was just before that load
    /// (so an edit made meanwhile is still noticed).
    init(
        source: PolicySource,
        stamp: FileStamp?,
        enforcer: QuotaEnforcer,
        store: (any LedgerStore)?,
        keys: LiveKeyRegistry? = nil,
        pollInterval: Duration = .seconds(2),
        clock: BridgeClock,
        logger: Logger
    ) {
        self.source = source
        self.enforcer = enforcer
        self.store = store
        self.keys = keys
        self.pollInterval = pollInterval
        self.clock = clock
        self.logger = logger
        let status = Status(
            source: source.description,
            subkeys: enforcer.subjectCount,
            loadedAt: clock.now(),
            error: nil,
            fileExists: source.exists
        )
        self.state = Mutex((status, stamp))
        (self.outcomes, self.outcomeSink) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(16))
    }

    public var status: Status { state.withLock { $0.status } }

    public func run() async throws {
        let hangUps = await UnixSignalsSequence(trapping: .sighup)
        await withDiscardingTaskGroup { group in
            group.addTask {
                for await _ in hangUps {
                    await self.reload(trigger: "SIGHUP")
                }
            }
            let watchesFile = if case .file = source { true } else { false }
            if watchesFile || keys != nil {
                group.addTask {
                    while !Task.isCancelled {
                        try? await Task.sleep(for: self.pollInterval)
                        if !Task.isCancelled, watchesFile { await self.reloadIfChanged() }
                        if !Task.isCancelled { await self.keys?.poll() }
                    }
                }
            }
            try? await gracefulShutdown()
            group.cancelAll()
        }
        outcomeSink.finish()
    }

    /// Reloads when the policy file's identity, size or modification time changed since the last attempt.
    public func reloadIfChanged() async {
        let stamp = source.stamp
        let changed = state.withLock { $0.stamp != stamp }
        if changed { await reload(trigger: "file changed") }
    }

    /// Reads the policy again (and, on SIGHUP, the key names and states) and swaps it in if it is valid.
    public func reload(trigger: String) async {
        let stamp = source.stamp
        let outcome: Outcome
        do throws(PolicyError) {
            // A file that vanished is far more likely a mistake (or a tool's delete-then-write) than a wish to
            // refuse everyone: the policy in force stays. (At start, a missing file is an empty policy.)
            guard source.exists else { throw PolicyError("\(source): no such file") }
            let policy = try source.load()
            enforcer.replace(policy: policy)
            state.withLock { state in
                state.stamp = stamp
                state.status.subkeys = policy.subjects.count
                state.status.loadedAt = clock.now()
                state.status.error = nil
                state.status.fileExists = source.exists
            }
            logger.notice(
                "quota policy loaded",
                metadata: ["source": "\(source)", "subkeys": "\(policy.subjects.count)", "trigger": "\(trigger)"]
            )
            for warning in policy.warnings {
                logger.warning("quota policy: \(warning)")
            }
            if let keys, let problem = Self.missingTemplates(in: policy, usedBy: keys) {
                logger.warning("quota policy: \(problem)")
            }
            outcome = .loaded(subkeys: policy.subjects.count)
        } catch {
            state.withLock { state in
                state.stamp = stamp
                state.status.error = error.message
            }
            logger.error(
                "quota policy rejected; the previous policy stays in force",
                metadata: ["source": "\(source)", "error": "\(error.message)", "trigger": "\(trigger)"]
            )
            outcome = .rejected(error.message)
        }
        if trigger == "SIGHUP", let keys { await keys.reload() }
        if trigger == "SIGHUP", let store {
            do {
                enforcer.replace(directory: try await store.directory())
            } catch {
                logger.error("could not re-read key names and states", metadata: ["error": "\(LedgerWriter.describe(error))"])
            }
        }
        outcomeSink.yield(outcome)
    }

    /// Templates active managed keys name that `policy` does not define: those keys refuse every model until it
    /// does (or they get another template with `keys update`).
    static func missingTemplates(in policy: QuotaPolicy, usedBy keys: LiveKeyRegistry) -> String? {
        let missing = keys.templatesInUse.filter { policy.templates[$0.key] == nil }.sorted { $0.key < $1.key }
        guard !missing.isEmpty else { return nil }
        let uses = missing.map { "'\($0.key)' (keys \($0.value.sorted().joined(separator: ", ")))" }
        return "_templates lacks \(uses.joined(separator: "; ")), which managed keys use: they refuse every model "
            + "until it is defined again or they get another template (keys update)"
    }
}
