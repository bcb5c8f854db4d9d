import Crypto
import Foundation

/// How the `keys` commands make subkeys: `<prefix>_<id>_<secret>`, URL-safe, where `id` is the key's short non-secret
/// id (what logs, reports, the ledger and Splunk call it) and `secret` 40 random base62 characters (about 238 bits).
/// Only the SHA-256 of the whole key is stored.
public enum KeyFormat {
    public static let defaultPrefix = "oai"
    /// 12 characters of a 32-letter alphabet without look-alikes (no l, o, 0, 1): 60 bits, so ids never collide in
    /// practice (a collision is still caught by the registry's primary key).
    public static let idLength = 12
    public static let secretLength = 40
    static let idAlphabet = Array("abcdefghijkmnpqrstuvwxyz23456789".utf8)
    static let secretAlphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789".utf8)

    /// Bits of randomness in a secret.
    public static var secretBits: Double { Double(secretLength) * log2(Double(secretAlphabet.count)) }

    public static func newID() -> String {
        var generator = SystemRandomNumberGenerator()
        let letters = (0..<idLength).map { _ in idAlphabet[Int(generator.next(upperBound: UInt8(idAlphabet.count)))] }
        return String(decoding: letters, as: UTF8.self)
    }

    /// Uniform over the alphabet: `next(upperBound:)` rejects the biased tail of each random byte. On Linux
    /// `SystemRandomNumberGenerator` reads `getrandom(2)`.
    public static func newSecret() -> String {
        var generator = SystemRandomNumberGenerator()
        let letters = (0..<secretLength).map { _ in
            secretAlphabet[Int(generator.next(upperBound: UInt8(secretAlphabet.count)))]
        }
        return String(decoding: letters, as: UTF8.self)
    }

    public static func key(prefix: String, id: String, secret: String) -> String { "\(prefix)_\(id)_\(secret)" }

    /// The id a key made by this bridge carries (its next-to-last `_` field), or `nil` for any other string (an
    /// imported key, say). Says nothing about whether the key is valid.
    public static func embeddedID(in key: String) -> String? {
        let fields = key.utf8.split(separator: UInt8(ascii: "_"), omittingEmptySubsequences: false)
        guard fields.count >= 3, let secret = fields.last, secret.count == secretLength,
            secret.allSatisfy({ secretAlphabet.contains($0) })
        else { return nil }
        let id = fields[fields.count - 2]
        guard id.count == idLength, id.allSatisfy({ idAlphabet.contains($0) }) else { return nil }
        return String(decoding: id, as: UTF8.self)
    }

    /// A prefix is 1 to 32 letters, digits, `-` or `_`, starting with a letter or digit: it stays URL-safe and
    /// cannot be confused with the id and secret that follow it.
    public static func validatePrefix(_ prefix: String) -> String? {
        let bytes = Array(prefix.utf8)
        guard (1...32).contains(bytes.count) else { return "must be 1 to 32 characters" }
        func isAlphanumeric(_ byte: UInt8) -> Bool {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
        }
        guard isAlphanumeric(bytes[0]) else { return "must start with a letter or digit" }
        guard bytes.allSatisfy({ isAlphanumeric($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") }) else {
            return "may hold only letters, digits, '-' and '_'"
        }
        return nil
    }

    /// SHA-256 of a subkey, as the registry stores it.
    public static func hash(_ key: String) -> [UInt8] { Array(SHA256.hash(data: Array(key.utf8))) }
}
