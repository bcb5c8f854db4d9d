import Foundation

/// `usage report`: ledger rows grouped by subkey, model, day or month, as an aligned table, CSV or JSON.
/// Keys appear by id (hashed for policy-file keys) with their name when one is known, never in plaintext.
public struct UsageReport: Sendable {
    public enum Format: String, Sendable, CaseIterable {
        case table
        case csv
        case json
    }

    public struct Line: Sendable, Equatable {
        /// The key id, model, day or month.
        public var group: String
        /// A key's name (`--by subkey` only).
        public var name: String?
        public var tally: Tally
    }

    public var grouping: UsageQuery.Grouping
    public var lines: [Line]

    /// Groups `rows`; `names` maps key ids to what to call them.
    public init(rows: [UsageReportRow], grouping: UsageQuery.Grouping, names: [String: String] = [:]) {
        self.grouping = grouping
        var totals: [String: Tally] = [:]
        for row in rows {
            let group: String
            switch grouping {
            case .subkey: group = row.keyID
            case .model: group = row.model
            case .day: group = row.period ?? "-"
            case .month: group = row.period.map { String($0.prefix(7)) } ?? "-"
            }
            totals[group, default: Tally()].add(row.tally)
        }
        var lines = totals.map { Line(group: $0.key, name: grouping == .subkey ? names[$0.key] : nil, tally: $0.value) }
        switch grouping {
        case .subkey, .model:
            lines.sort {
                ($0.tally.totalTokens, $0.tally.requests, $1.group) > ($1.tally.totalTokens, $1.tally.requests, $0.group)
            }
        case .day, .month:
            lines.sort { $0.group < $1.group }
        }
        self.lines = lines
    }

    public var total: Tally {
        var total = Tally()
        for line in lines { total.add(line.tally) }
        return total
    }

    private var groupHeader: String {
        switch grouping {
        case .subkey: "key_id"
        case .model: "model"
        case .day: "day"
        case .month: "month"
        }
    }

    public func render(_ format: Format) -> String {
        switch format {
        case .table: table()
        case .csv: csv()
        case .json: json()
        }
    }

    private func numbers(_ tally: Tally) -> [String] {
        [String(tally.requests), String(tally.promptTokens), String(tally.completionTokens), String(tally.totalTokens)]
    }

    private func table() -> String {
        let named = grouping == .subkey
        var header = [groupHeader]
        if named { header.append("name") }
        header += ["requests", "prompt_tokens", "completion_tokens", "total_tokens"]
        var rows = [header]
        for line in lines {
            rows.append([line.group] + (named ? [line.name ?? ""] : []) + numbers(line.tally))
        }
        rows.append(["TOTAL"] + (named ? [""] : []) + numbers(total))
        let first = named ? 2 : 1
        return TextTable.render(rows, rightAligned: Set(first..<(first + 4)))
    }

    private func csv() -> String {
        let named = grouping == .subkey
        var out =
            ([groupHeader] + (named ? ["name"] : []) + ["requests", "prompt_tokens", "completion_tokens", "total_tokens"])
            .joined(separator: ",") + "\n"
        for line in lines {
            let cells = [Self.csvField(line.group)] + (named ? [Self.csvField(line.name ?? "")] : []) + numbers(line.tally)
            out += cells.joined(separator: ",") + "\n"
        }
        return out
    }

    /// RFC 4180: quoted when it holds a comma, quote or line break, with quotes doubled. A leading `=`, `+`, `-` or
    /// `@` is prefixed with `'` so a spreadsheet never runs a name as a formula.
    static func csvField(_ text: String) -> String {
        var text = text
        if let first = text.first, "=+-@".contains(first) { text = "'" + text }
        guard text.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) else { return text }
        return "\"" + text.replacingOccurrences(of: "\"", with: "\"\"") + "\""
    }

    private func json() -> String {
        var out: [UInt8] = Array("[".utf8)
        for (index, line) in lines.enumerated() {
            out += Array((index == 0 ? "\n  {" : ",\n  {").utf8)
            JSONString.encode(groupHeader, into: &out)
            out += Array(": ".utf8)
            JSONString.encode(line.group, into: &out)
            if grouping == .subkey {
                out += Array(#", "name": "#.utf8)
                if let name = line.name { JSONString.encode(name, into: &out) } else { out += Array("null".utf8) }
            }
            let tally = line.tally
            out += Array(
                #", "requests": \#(tally.requests), "prompt_tokens": \#(tally.promptTokens), "completion_tokens": \#(tally.completionTokens), "total_tokens": \#(tally.totalTokens)}"#
                    .utf8
            )
        }
        out += Array((lines.isEmpty ? "]\n" : "\n]\n").utf8)
        return String(decoding: out, as: UTF8.self)
    }
}
