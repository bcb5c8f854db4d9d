import Benchmark
import OAIToCircuit

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The bridge's request path, one stage at a time, so that a regression shows in the stage that has it: rewriting
/// the client's body, scanning Circuit's stream, quota checks, and the ledger's commit.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal, Benchmark.cpuTime],
        // Nanoseconds throughout, so that wall clock and CPU time read side by side.
        timeUnits: .nanoseconds,
        units: [Benchmark.cpuTime: .count],
        warmupIterations: 3,
        maxDuration: .seconds(3),
        maxIterations: 10_000
    )
    chatRequestBenchmarks()
    serverSentEventBenchmarks()
    quotaBenchmarks()
    ledgerBenchmarks()
}

extension Benchmark {
    /// CPU time of the whole process (every thread: SQLite's included), per operation. Benchmark's own `cpuTotal`
    /// reads /proc/self/stat, which on Linux counts 10 ms scheduler ticks: an iteration here is far shorter, so it
    /// would read 0 or 10 ms.
    static let cpuTime = BenchmarkMetric.custom("CPU time (ns)")

    /// Runs `operation` once per scaled iteration and records the CPU time they took together.
    func measure(_ operation: () throws -> Void) rethrows {
        let start = Self.processCPUTime()
        for _ in scaledIterations { try operation() }
        measurement(Self.cpuTime, Self.processCPUTime() - start)
    }

    func measureAsync(_ operation: () async throws -> Void) async rethrows {
        let start = Self.processCPUTime()
        for _ in scaledIterations { try await operation() }
        measurement(Self.cpuTime, Self.processCPUTime() - start)
    }

    private static func processCPUTime() -> Int {
        var time = timespec()
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &time)
        return time.tv_sec * 1_000_000_000 + time.tv_nsec
    }
}

extension BridgeClock {
    /// 2025-12-02T11:50:45Z, for quotas and the ledger.
    static let fixed = BridgeClock { 1_764_676_245 }
}
