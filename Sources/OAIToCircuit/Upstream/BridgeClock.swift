import Foundation

/// Wall-clock time in seconds since 1970, injectable so tests can move time instead of sleeping.
public struct BridgeClock: Sendable {
    public var now: @Sendable () -> Double

    public init(now: @escaping @Sendable () -> Double) {
        self.now = now
    }

    public static let system = BridgeClock { Date().timeIntervalSince1970 }
}
