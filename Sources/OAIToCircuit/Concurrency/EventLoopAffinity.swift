import NIOCore
import NIOPosix

/// Where a resumed task continues. With NIO's event loops as Swift concurrency's executor (the executable installs
/// them at start, see `Entry`), a task continues on the thread that resumed it. A continuation resumed by another thread (the database's, or another
/// loop's) would move a request's task away from the loop that owns its client's connection, and every write to
/// that client would then cross threads. Resuming on the loop the task came from keeps it home.
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
