import NIOCore
import NIOPosix
import OAIToCircuit

@main
struct Entry {
    static func main() async {
        // Swift concurrency's jobs run on NIO's event loops, where the sockets are, instead of hopping between
        // them and the concurrency pool's threads on every read and write (the largest cost in the request path's
        // profile). Installed first, before anything else enqueues work.
        NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
        await OAIToCircuitCommand.main()
    }
}
