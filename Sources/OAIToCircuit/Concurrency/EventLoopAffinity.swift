import NIOCore
import NIOPosix

/// Where a resumed task continues. With NIO's event loops as Swift concurrency's executor (the executable installs
/// them at start, see `Entry`), a task without an executor preference continues on the thread that resumed it. A
/// continuation resumed by another thread would move such a task away from the loop that owns its client's
/// connection, and every write to that client would then cross threads. Resuming on the loop the task came from keeps
/// it home. (A request's task prefers its loop as executor, see `EventLoopTaskExecutor`, so the database thread
/// resumes a commit's waiter directly; the ledger writer's waiters still come back through here.)
enum EventLoopAffinity {
    /// The NIO event loop the caller runs on, if any.
    static var current: (any EventLoop)? { MultiThreadedEventLoopGroup.currentEventLoop }

    /// Runs `resume` on `loop` (at once when already there, or when there is no loop to go back to).
    static func resume(on loop: (any EventLoop)?, _ resume: @escaping @Sendable () -> Void) {
        if let loop, !loop.inEventLoop {
            loop.execute(resume)
        } else {
            resume()
        }
    }
}

/// One event loop as a task executor. A request's task prefers the loop of its client's connection
/// (`ExchangeHandler`), so it stays there, and its calls into nonisolated async code run on it as they come. NIO's
/// global executor runs each job as if isolated to the loop's serial executor, so there every such call switched
/// executors, each switch a trip through the loop's queue: about 40 jobs per chat request, 3 with this
/// (docs/PERFORMANCE.md, change 8).
final class EventLoopTaskExecutor: TaskExecutor {
    let loop: any EventLoop

    init(_ loop: any EventLoop) {
        self.loop = loop
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}
