import Foundation

/// Reads `--env-file`: `KEY=VALUE` lines, `#` comments, blank lines, an optional `export ` prefix
/// and optional single or double quotes around the value.
public enum EnvironmentFile {
    public static func load(path: String) throws -> [String: String] {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ConfigurationError("--env-file", "cannot read \(path)")
        }
        return try parse(text, origin: path)
    }

    public static func parse(_ text: String, origin: String = "env file") throws -> [String: String] {
        var values: [String: String] = [:]
        for (number, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            var line = rawLine.trimmingCharacters(in: .whitespacesAndNewlines)
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("export ") { line = String(line.dropFirst(7)).trimmingCharacters(in: .whitespaces) }
            guard let equals = line.firstIndex(of: "=") else {
                throw ConfigurationError("--env-file", "\(origin) line \(number + 1) is not KEY=VALUE")
            }
            let key = line[..<equals].trimmingCharacters(in: .whitespaces)
            guard !key.isEmpty, key.allSatisfy({ $0 == "_" || $0.isLetter || $0.isNumber }) else {
                throw ConfigurationError("--env-file", "\(origin) line \(number + 1) has an invalid variable name")
            }
            values[key] = unquote(line[line.index(after: equals)...].trimmingCharacters(in: .whitespaces))
        }
        return values
    }

    private static func unquote(_ value: String) -> String {
        if value.count >= 2, let first = value.first, first == "\"" || first == "'", value.last == first {
            let inner = String(value.dropFirst().dropLast())
            guard first == "\"" else { return inner }
            // Double quotes take the escapes \", \\ and \n (read in one pass, so "\\n" is a backslash and an n);
            // any other backslash is kept as written.
            var result = ""
            var escaping = false
            for character in inner {
                if escaping {
                    switch character {
                    case "n": result.append("\n")
                    case "\"", "\\": result.append(character)
                    default: result.append(contentsOf: ["\\", character])  // any other backslash is kept
                    }
                    escaping = false
                } else if character == "\\" {
                    escaping = true
                } else {
                    result.append(character)
                }
            }
            if escaping { result.append("\\") }
            return result
        }
        // An unquoted value ends at an inline comment.
        if let hash = value.range(of: " #") { return value[..<hash.lowerBound].trimmingCharacters(in: .whitespaces) }
        return value
    }

    /// `environment` with the file's variables added where it has none: set and non-empty in the process wins;
    /// empty counts as unset (systemd writes `Environment="X="`). Without a path, `environment` as it is.
    static func merged(into environment: [String: String], from path: String?) throws -> [String: String] {
        guard let path else { return environment }
        var merged = environment
        for (name, value) in try load(path: path) where merged[name]?.isEmpty ?? true {
            merged[name] = value
        }
        return merged
    }
}
