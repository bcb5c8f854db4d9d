import Logging
import Synchronization

/// The keys registry as the running bridge sees it: an in-memory copy of the database's tables, looked up by the
/// SHA-256 of the presented subkey (never by the secret itself, and with a constant-time comparison).
///
/// It stays current without a restart: every request first reads the key-change bell (one 8-byte pread) and, when a
/// `keys` command rang it, reloads before authorising, so a revocation holds from the very next request. A poll of
/// the registry's version (`poll()`, every few seconds from the policy reloader) catches a change whose bell could not
/// be rung. A rotated secret stops working when its grace ends, checked on each lookup against the clock.
public final class LiveKeyRegistry: KeyRegistry {
    struct Secret {
        var keyID: String
        var expiresAt: Double?
    }

    struct Snapshot {
        var version: Int64 = -1
        var keys: [String: ManagedKey] = [:]
        var secrets: [SubkeyDigest: Secret] = [:]
        var aliases: [String: String] = [:]
        var contents = KeyRegistryContents()
    }

    struct State {
        var snapshot = Snapshot()
        var generation = 0
        /// The bell's value when the snapshot in force was read.
        var bellSeen: UInt64 = 0
        /// After a failed reload, none is tried again before this time (so a broken database is not asked once per
        /// request).
        var retryAfter: Double = 0
        var reloading: Task<Void, Never>?
    }

    private let state = Mutex(State())
    private let bell: Mutex<KeyChangeBell?>
    let source: any KeyRegistrySource
    private let clock: BridgeClock
    private let logger: Logger
    /// Told about keys newly imported from a policy file: `adopt` (their old hashed ids and their ids now) before and
    /// after the registry that knows them is swapped in, `fold` once it is.
    private let importObserver = Mutex<
        (adopt: @Sendable ([String: String]) -> Void, fold: @Sendable (KeyRegistryContents) async -> Void)?
    >(nil)

    /// Reads the registry once; throws when the database cannot be read.
    public init(
        source: any KeyRegistrySource,
        bell: KeyChangeBell?,
        clock: BridgeClock,
        logger: Logger
    ) async throws {
        self.source = source
        self.bell = Mutex(bell)
        self.clock = clock
        self.logger = logger
        let seen = bell?.value ?? 0
        publish(build(try await source.keyRegistry()), bellSeen: seen)
    }

    /// Sets what hears about newly imported keys: the enforcer moves their counters (`adopt`), the ledger moves
    /// rows requests in flight wrote under their old names (`fold`).
    public func onImport(
        adopt: @escaping @Sendable ([String: String]) -> Void,
        fold: @escaping @Sendable (KeyRegistryContents) async -> Void
    ) {
        importObserver.withLock { $0 = (adopt, fold) }
    }

    // MARK: KeyRegistry

    public func key(for digest: SubkeyDigest) -> ManagedKey? {
        let found = state.withLock { state -> (ManagedKey, Double?)? in
            guard let secret = state.snapshot.secrets[digest], let key = state.snapshot.keys[secret.keyID] else {
                return nil
            }
            return (key, secret.expiresAt)
        }
        guard var (key, expiresAt) = found else { return nil }
        if let expiresAt, clock.now() >= expiresAt { key.isActive = false }
        return key
    }

    public func contains(keyID: String) -> Bool { state.withLock { $0.snapshot.keys[keyID] != nil } }

    public var generation: Int { state.withLock { $0.generation } }

    public func refreshIfChanged() async {
        guard let bell = bell.withLock({ $0 }) else { return }
        // Twice at most: a reload already running may have read the bell before it rang again.
        for _ in 0..<2 {
            let rung = bell.value
            let (current, retryAfter) = state.withLock { ($0.bellSeen, $0.retryAfter) }
            guard rung != current, clock.now() >= retryAfter else { return }
            await reload()
        }
    }

    /// The imported keys' old hashed ids and their ids now.
    public var aliases: [String: String] { state.withLock { $0.snapshot.aliases } }

    public var contents: KeyRegistryContents { state.withLock { $0.snapshot.contents } }

    /// Keys that may be used (not revoked or replaced).
    public var activeCount: Int { state.withLock { $0.snapshot.keys.values.filter(\.isActive).count } }

    /// Templates managed keys name (the policy must keep defining them).
    public var templatesInUse: [String: [String]] {
        state.withLock { state in
            var uses: [String: [String]] = [:]
            for key in state.snapshot.keys.values where key.isActive {
                if let template = key.template { uses[template, default: []].append(key.keyID) }
            }
            return uses
        }
    }

    // MARK: Reloading

    /// Reads the registry again, once however many requests ask at the same moment.
    public func reload() async {
        let task = state.withLock { state -> Task<Void, Never> in
            if let running = state.reloading { return running }
            let task = Task { await self.performReload() }
            state.reloading = task
            return task
        }
        await task.value
    }

    /// Reloads when the registry's version moved (a change whose bell was not rung), and maps the bell again when
    /// its file was replaced.
    public func poll() async {
        let current = bell.withLock { $0 }
        if current == nil || current?.isCurrent == false, let path = current?.path ?? bellPath {
            if let fresh = KeyChangeBell(path: path, create: true) {
                bell.withLock { $0 = fresh }
            }
        }
        do {
            let version = try await source.keyRegistryVersion()
            if version != state.withLock({ $0.snapshot.version }) { await reload() }
        } catch {
            logger.error("could not read the keys registry", metadata: ["error": "\(LedgerWriter.describe(error))"])
        }
    }

    /// Where the bell lives when none could be opened at start (set by whoever made the registry).
    var bellPath: String? {
        get { bellPathState.withLock { $0 } }
        set { bellPathState.withLock { $0 = newValue } }
    }
    private let bellPathState = Mutex<String?>(nil)

    private func performReload() async {
        let seen = bell.withLock { $0 }?.value ?? 0
        do {
            let contents = try await source.keyRegistry()
            let snapshot = build(contents)
            let observer = importObserver.withLock { $0 }
            let added = state.withLock { state in snapshot.aliases.filter { state.snapshot.aliases[$0.key] == nil } }
            // Counters move before the keys are known by their new ids, so no request sees an imported key start from
            // zero; and again after, for requests admitted under the old ids meanwhile.
            if !added.isEmpty { observer?.adopt(added) }
            let changed = publish(snapshot, bellSeen: seen)
            state.withLock { $0.reloading = nil }
            if changed {
                logger.notice("keys registry reloaded", metadata: ["keys": "\(contents.keys.count)"])
            }
            if !added.isEmpty, let observer {
                observer.adopt(added)
                await observer.fold(contents)
            }
        } catch {
            let now = clock.now()
            state.withLock { state in
                state.reloading = nil
                state.retryAfter = now + 1
            }
            logger.error(
                "could not reload the keys registry; the keys loaded before stay in force",
                metadata: ["error": "\(LedgerWriter.describe(error))"]
            )
        }
    }

    /// Swaps `snapshot` in; returns whether the registry changed.
    @discardableResult
    private func publish(_ snapshot: Snapshot, bellSeen: UInt64) -> Bool {
        state.withLock { state in
            let changed = state.snapshot.version != snapshot.version
            if changed { state.generation += 1 }
            state.snapshot = snapshot
            state.bellSeen = bellSeen
            state.retryAfter = 0
            return changed
        }
    }

    private func build(_ contents: KeyRegistryContents) -> Snapshot {
        var snapshot = Snapshot(version: contents.version, contents: contents)
        for record in contents.keys {
            do {
                _ = try record.parsedRules()
            } catch {
                logger.error(
                    "a managed key's rules do not parse; every model is refused for it",
                    metadata: ["key_id": "\(record.id)", "error": "\(error.message)"]
                )
            }
            let rules = record.enforcedRules
            snapshot.keys[record.id] = ManagedKey(
                keyID: record.id,
                friendlyName: record.name,
                email: record.email,
                template: record.template,
                rules: rules,
                isActive: record.status == .active
            )
        }
        for secret in contents.secrets {
            guard let digest = SubkeyDigest(hash: secret.hash), snapshot.keys[secret.keyID] != nil else { continue }
            snapshot.secrets[digest] = Secret(keyID: secret.keyID, expiresAt: secret.expiresAt)
        }
        snapshot.aliases = contents.importedAliases
        return snapshot
    }
}
