/// A configuration value that cannot be used. The bridge prints `description` on one line and exits 78.
public struct ConfigurationError: Error, CustomStringConvertible, Equatable {
    /// The environment variable or command-line flag at fault, e.g. `UPSTREAM_TIMEOUT_SECONDS` or `--port`.
    public var name: String
    /// What is wrong with it, without echoing secret values.
    public var problem: String

    public init(_ name: String, _ problem: String) {
        self.name = name
        self.problem = problem
    }

    public var description: String { "invalid configuration: \(name): \(problem)" }
}
