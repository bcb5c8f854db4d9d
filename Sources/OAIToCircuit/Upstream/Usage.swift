/// Token counts Circuit reported for one answer.
public struct Usage: Sendable, Equatable, CustomStringConvertible {
    public var promptTokens: Int
    public var completionTokens: Int
    public var totalTokens: Int

    public init(promptTokens: Int = 0, completionTokens: Int = 0, totalTokens: Int? = nil) {
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.totalTokens = totalTokens ?? promptTokens + completionTokens
    }

    public static let zero = Usage()

    public var description: String { "prompt=\(promptTokens) completion=\(completionTokens) total=\(totalTokens)" }
}

extension Usage {
    /// What one JSON object (a whole answer or one streamed chunk) says about usage.
    public struct Observation: Equatable {
        public var usage: Usage?
        /// The object has `"choices": []`; with `usage` set that is the usage-only chunk of a stream.
        public var hasEmptyChoices: Bool
    }

    /// Reads `usage` and `choices` from a JSON object; `nil` when the bytes are not a JSON object.
    public static func observe(_ bytes: UnsafeBufferPointer<UInt8>) -> Observation? {
        guard let members = try? JSONScanner.objectMembers(bytes) else { return nil }
        var observation = Observation(usage: nil, hasEmptyChoices: false)
        for member in members {
            switch member.key {
            case "usage":
                let value = UnsafeBufferPointer(rebasing: bytes[member.value])
                guard let fields = try? JSONScanner.objectMembers(value) else {
                    observation.usage = nil
                    continue
                }
                var prompt = 0
                var completion = 0
                var total: Int?
                for field in fields {
                    let number = integer(UnsafeBufferPointer(rebasing: value[field.value]))
                    switch field.key {
                    case "prompt_tokens": prompt = number ?? 0
                    case "completion_tokens": completion = number ?? 0
                    case "total_tokens": total = number
                    default: break
                    }
                }
                observation.usage = Usage(promptTokens: prompt, completionTokens: completion, totalTokens: total)
            case "choices":
                let value = bytes[member.value]
                observation.hasEmptyChoices =
                    value.first == UInt8(ascii: "[")
                    && value.dropFirst().allSatisfy {
                        $0 == UInt8(ascii: "]") || $0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09
                    }
            default: break
            }
        }
        return observation
    }

    /// Token counts are believed up to this; a larger one is clamped, so no sum can overflow.
    static let maximumCount = 1_000_000_000_000_000

    /// A non-negative whole number (`12`, `12.0`, `1.2e1`), clamped to `maximumCount`, else `nil`.
    private static func integer(_ bytes: UnsafeBufferPointer<UInt8>) -> Int? {
        let text = String(decoding: bytes, as: UTF8.self)
        if let value = Int(text) { return min(max(0, value), maximumCount) }
        if let value = Double(text), value.isFinite { return Int(min(max(0, value), Double(maximumCount))) }
        return nil
    }
}
