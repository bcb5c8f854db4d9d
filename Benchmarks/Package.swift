// swift-tools-version:6.2
import PackageDescription

// Micro-benchmarks of the bridge's request path, with ordo-one/benchmark. A package of its own, so the bridge neither
// depends on the benchmark tool nor builds it. Run from this directory:
// `swift package --disable-sandbox benchmark` (see README.md).
let package = Package(
    name: "oai-to-circuit-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        // Named: a path dependency is otherwise known by its folder's name, which depends on the clone.
        .package(name: "oai-to-circuit", path: ".."),
        // Malloc counts come from ordo-one's malloc interposer on Swift 6.3 (no jemalloc to install). Naming the trait
        // leaves out the other default one, RuntimeInterposer (ARC counts on Linux), whose package is not mirrored.
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        // Only to build a ledger entry until `UsageRecord` has a public initialiser (see LedgerBenchmarks.swift).
    ],
    targets: [
        .executableTarget(
            name: "RequestPath",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "OAIToCircuit", package: "oai-to-circuit"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Benchmarks/RequestPath",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        )
    ]
)
