import NIOPosix
import Synchronization

/// How many requests an event loop's connections are answering, counted on the loop's own thread: an answer's
/// task counts from its dispatch until it is over (`ExchangeHandler`).
///
/// It tells the ledger writer when a commit may run on the loop itself instead of on the database's thread
/// (`LedgerWriter`): only when the request committing is the loop's only one, so the few dozen microseconds the loop
/// spends in SQLite hold up nobody but that request, which waits for its commit in either case. Under any
/// concurrency the commit stays on the database's thread, and the loop stays free for the others.
final class LoopLoad: Sendable {
    private let answering = Atomic(0)

    private static let perThread = ThreadSpecificVariable<LoopLoad>()

    /// The count of the calling thread, made on its first use there. Called by a connection's handler, on its loop.
    static func ofCurrentThread() -> LoopLoad {
        if let load = perThread.currentValue { return load }
        let load = LoopLoad()
        perThread.currentValue = load
        return load
    }

    /// Whether the caller runs on an event loop thread whose connections answer at most one request (the caller's
    /// own). `false` on any other thread, and on a loop that no connection has used yet.
    static var callerIsAlone: Bool {
        guard let load = perThread.currentValue else { return false }
        return load.answering.load(ordering: .relaxed) <= 1
    }

    var requests: Int { answering.load(ordering: .relaxed) }

    func started() { answering.add(1, ordering: .relaxed) }

    func ended() { answering.subtract(1, ordering: .relaxed) }
}
