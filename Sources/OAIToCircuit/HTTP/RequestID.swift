import Synchronization

/// New request ids, shaped as version-4 UUIDs (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`, lower case).
///
/// Foundation's `UUID()` opens, reads and closes `/dev/urandom` for each one: three system calls on every request
/// that brings no id of its own. These come from a counter scrambled by splitmix64's finaliser (a bijection) under
/// keys drawn once per process: distinct within a process by construction, and across processes with the odds of
/// random UUIDs. They identify requests; they are not secrets (a client may send its own).
enum RequestID {
    private static let keys = (UInt64.random(in: .min ... .max), UInt64.random(in: .min ... .max))
    private static let counter = Atomic<UInt64>(0)

    static func next() -> String {
        let count = counter.wrappingAdd(1, ordering: .relaxed).newValue
        let high = mix(count &+ keys.0)
        let low = mix(high ^ keys.1)
        // Version 4 and the RFC 4122 variant, as random UUIDs carry them.
        return format(high: (high & ~0xF000) | 0x4000, low: (low & ~(0b11 << 62)) | (0b10 << 62))
    }

    private static func mix(_ value: UInt64) -> UInt64 {
        var z = value
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    private static func format(high: UInt64, low: UInt64) -> String {
        String(unsafeUninitializedCapacity: 36) { buffer in
            let digits: StaticString = "0123456789abcdef"
            var position = 0
            func put(_ word: UInt64, nibbles: Range<Int>) {
                for nibble in nibbles {
                    if position == 8 || position == 13 || position == 18 || position == 23 {
                        buffer[position] = UInt8(ascii: "-")
                        position += 1
                    }
                    let value = Int((word >> UInt64(60 - 4 * nibble)) & 0xF)
                    buffer[position] = digits.utf8Start[value]
                    position += 1
                }
            }
            put(high, nibbles: 0..<16)
            put(low, nibbles: 0..<16)
            return position
        }
    }
}
