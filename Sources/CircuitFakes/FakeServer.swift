import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle

/// Runs a Hummingbird responder on `127.0.0.1:0` in the background and reports the port it got.
/// `stop()` shuts it down gracefully; tests call it on every path (`withFake…` helpers do).
public final class FakeServer: Sendable {
    public let port: Int
    private let group: ServiceGroup
    private let task: Task<Void, any Error>

    public static func start<Responder: HTTPResponder>(
        _ responder: Responder,
        port requested: Int = 0,
        host: String = "127.0.0.1"
    )
        async throws -> FakeServer where Responder.Context == BasicRequestContext
    {
        var logger = Logger(label: "fake", factory: { _ in SwiftLogNoOpLogHandler() })
        logger.logLevel = .critical
        let (ports, portSource) = AsyncStream<Int>.makeStream()
        let application = Application(
            responder: responder,
            configuration: .init(address: .hostname(host, port: requested)),
            onServerRunning: { channel in
                portSource.yield(channel.localAddress?.port ?? requested)
                portSource.finish()
            },
            logger: logger
        )
        let group = ServiceGroup(
            configuration: .init(services: [application], gracefulShutdownSignals: [], logger: logger)
        )
        let task = Task { try await group.run() }
        var iterator = ports.makeAsyncIterator()
        guard let port = await iterator.next() else {
            task.cancel()
            throw FakeServerError.didNotStart
        }
        return FakeServer(port: port, group: group, task: task)
    }

    private init(port: Int, group: ServiceGroup, task: Task<Void, any Error>) {
        self.port = port
        self.group = group
        self.task = task
    }

    public var baseURL: String { "http://127.0.0.1:\(port)" }

    public func stop() async {
        await group.triggerGracefulShutdown()
        _ = await task.result
    }
}

public enum FakeServerError: Error {
    case didNotStart
}

/// A list of what a fake saw, which tests can wait on without sleeping.
public actor Journal<Entry: Sendable> {
    public private(set) var entries: [Entry] = []
    private var waiters: [(id: Int, predicate: @Sendable ([Entry]) -> Bool, continuation: CheckedContinuation<Void, Never>)] = []
    private var nextID = 0

    public init() {}

    public func append(_ entry: Entry) {
        entries.append(entry)
        let ready = waiters.filter { $0.predicate(entries) }
        waiters.removeAll { $0.predicate(entries) }
        for waiter in ready { waiter.continuation.resume() }
    }

    public var count: Int { entries.count }

    /// Returns once the entries satisfy `predicate`, or when the task is cancelled (a test's time limit), so a
    /// test waiting for something that never comes fails instead of hanging.
    public func wait(until predicate: @escaping @Sendable ([Entry]) -> Bool) async {
        if predicate(entries) { return }
        nextID += 1
        let id = nextID
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                if Task.isCancelled {
                    continuation.resume()
                } else {
                    waiters.append((id, predicate, continuation))
                }
            }
        } onCancel: {
            Task { await self.stopWaiting(id) }
        }
    }

    private func stopWaiting(_ id: Int) {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return }
        waiters.remove(at: index).continuation.resume()
    }
}
