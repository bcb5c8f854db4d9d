/// The rule a model name must satisfy before it becomes part of Circuit's URL path:
/// `^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$` and no `..`, so no name can reach another path or add a query.
public enum ModelName {
    public static let rule =
        "Invalid model name: use 1 to 128 characters from letters, digits, '.', '_', ':' and '-', starting with a letter or digit, without '..'"

    /// `nil` when `name` is valid, else the message naming the rule.
    public static func validate(_ name: String) -> String? {
        let utf8 = name.utf8
        guard let first = utf8.first, utf8.count <= 128, isAlphanumeric(first) else { return rule }
        var previous: UInt8 = 0
        for byte in utf8 {
            guard
                isAlphanumeric(byte) || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_")
                    || byte == UInt8(ascii: ":") || byte == UInt8(ascii: "-")
            else { return rule }
            if byte == UInt8(ascii: "."), previous == UInt8(ascii: ".") { return rule }
            previous = byte
        }
        return nil
    }

    private static func isAlphanumeric(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
    }
}
