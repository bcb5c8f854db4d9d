/// Which models a policy rule applies to: an exact name, `*` (every model), a glob (`gpt-4o*`, `claude-?-opus`), or
/// a regular expression written `re:<expression>` that must match the whole model name.
///
/// When several patterns match a model, the most specific wins: an exact name, then regular expressions (longest
/// first), then globs (most literal characters first), then `*`.
public struct ModelPattern: Sendable, CustomStringConvertible {
    public enum Kind: Int, Sendable, Comparable {
        case any = 0
        case glob = 1
        case regex = 2
        case exact = 3

        public static func < (lhs: Kind, rhs: Kind) -> Bool { lhs.rawValue < rhs.rawValue }
    }

    public let text: String
    public let kind: Kind
    private let regex: CompiledRegex?
    /// Orders patterns of one kind: literal characters for globs, length for regular expressions.
    private let weight: Int

    public var description: String { text }

    /// `*`: every model.
    public static let anyModel = ModelPattern(anyModel: ())

    private init(anyModel: Void) {
        self.text = "*"
        self.kind = .any
        self.regex = nil
        self.weight = 0
    }

    /// Throws when `text` starts with `re:` but is not a valid regular expression.
    init(_ text: String) throws(PolicyError) {
        self.text = text
        if text == "*" {
            self.kind = .any
            self.regex = nil
            self.weight = 0
        } else if text.hasPrefix("re:") {
            let expression = String(text.dropFirst(3))
            do {
                self.regex = CompiledRegex(try Regex(expression))
            } catch {
                throw PolicyError("model pattern '\(text)' is not a valid regular expression")
            }
            self.kind = .regex
            self.weight = expression.utf8.count
        } else if text.utf8.contains(where: { $0 == UInt8(ascii: "*") || $0 == UInt8(ascii: "?") }) {
            self.kind = .glob
            self.regex = nil
            self.weight = text.utf8.count { $0 != UInt8(ascii: "*") && $0 != UInt8(ascii: "?") }
        } else {
            self.kind = .exact
            self.regex = nil
            self.weight = text.utf8.count
        }
    }

    /// Whether this pattern could ever match a valid model name; an exact name or a glob with characters no model
    /// name has could not, which is worth a warning.
    var canMatchSomeModel: Bool {
        switch kind {
        case .any, .regex: true
        case .exact: ModelName.validate(text) == nil
        case .glob:
            text.utf8.allSatisfy { byte in
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: ":"),
                    UInt8(ascii: "-"), UInt8(ascii: "*"), UInt8(ascii: "?"):
                    true
                default: false
                }
            }
        }
    }

    public func matches(_ model: String) -> Bool {
        switch kind {
        case .any: true
        case .exact: model == text
        case .glob: Self.glob(Array(text.utf8), matches: Array(model.utf8))
        case .regex: regex?.wholeMatches(model) ?? false
        }
    }

    /// Whether `self` is more specific than `other` (ties broken by the text, so the order is total and stable).
    func isMoreSpecific(than other: ModelPattern) -> Bool {
        if kind != other.kind { return kind > other.kind }
        if weight != other.weight { return weight > other.weight }
        return text < other.text
    }

    /// `*` matches any run of characters, `?` exactly one. Model names are ASCII, so bytes are characters.
    static func glob(_ pattern: [UInt8], matches name: [UInt8]) -> Bool {
        var p = 0
        var n = 0
        var star: Int?
        var resume = 0
        while n < name.count {
            if p < pattern.count, pattern[p] == UInt8(ascii: "?") || pattern[p] == name[n] {
                p += 1
                n += 1
            } else if p < pattern.count, pattern[p] == UInt8(ascii: "*") {
                star = p
                resume = n
                p += 1
            } else if let star {
                // Let the last star swallow one more character and try again.
                p = star + 1
                resume += 1
                n = resume
            } else {
                return false
            }
        }
        while p < pattern.count, pattern[p] == UInt8(ascii: "*") { p += 1 }
        return p == pattern.count
    }
}

/// A compiled regular expression. `Regex` over `AnyRegexOutput` is not declared `Sendable`, but it is an immutable
/// value once compiled and matching never mutates it, so sharing it between tasks is safe.
private final class CompiledRegex: @unchecked Sendable {
    private let regex: Regex<AnyRegexOutput>

    init(_ regex: Regex<AnyRegexOutput>) { self.regex = regex }

    func wholeMatches(_ text: String) -> Bool { (try? regex.wholeMatch(in: text)) != nil }
}
