import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One line per log event on standard error: `2026-11-29T10:30:45Z info request key=value …`, never with colours.
/// Under systemd, when standard error is the journal's stream (`JOURNAL_STREAM` names it), a line is
/// `<5>request key=value …` instead: the syslog priority journald reads (so `journalctl -p warning` works) and no
/// timestamp of our own, since the journal stamps every line.
///
/// Unlike swift-log's `StreamLogHandler`, metadata is rendered only when a line is written: Hummingbird sets a
/// request id on the logger of every request, and rendering it each time showed up in the request path's profile.
public struct LineLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    public var logLevel: Logger.Level = .info
    let journal: Bool

    /// `journal`: write journald's priority prefixes; by default, when standard error is the journal.
    public init(label: String, journal: Bool? = nil) {
        self.journal = journal ?? Self.standardErrorIsJournal
    }

    /// Whether standard error is the stream `JOURNAL_STREAM` (`<device>:<inode>`) describes, as systemd sets it for
    /// a service whose output goes to the journal (and a child that inherits the variable but not the stream is not
    /// fooled).
    static let standardErrorIsJournal: Bool = {
        guard let text = getenv("JOURNAL_STREAM").map({ String(cString: $0) }) else { return false }
        let parts = text.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var status = stat()
        guard fstat(STDERR_FILENO, &status) == 0 else { return false }
        return UInt64(status.st_dev) == device && UInt64(status.st_ino) == inode
    }()

    /// syslog's priorities, as journald reads them from a `<N>` prefix.
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var line = journal ? "<\(Self.priority(event.level))>" : "\(Self.timestamp()) \(event.level) "
        line += event.message.description
        // Usually only the event's own metadata: no dictionary to merge then (this runs for every request).
        let provided = metadataProvider?.get() ?? [:]
        if metadata.isEmpty, provided.isEmpty, let own = event.metadata {
            append(own, to: &line)
        } else {
            var all = metadata
            all.merge(provided) { $1 }
            if let own = event.metadata { all.merge(own) { $1 } }
            append(all, to: &line)
        }
        // A value with a line break must not forge a second log line.
        if line.utf8.contains(where: { $0 == 0x0A || $0 == 0x0D }) {
            line = line.replacingOccurrences(of: "\r", with: "\\r").replacingOccurrences(of: "\n", with: "\\n")
        }
        line += "\n"
        // One write(2) per line, so lines from concurrent requests never interleave.
        line.withUTF8 { _ = write(output, $0.baseAddress, $0.count) }
    }

    private func append(_ metadata: Logger.Metadata, to line: inout String) {
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) {
            line += " "
            line += key
            line += "="
            line += value.description
        }
    }

    /// Where lines go (standard error; a test gives a pipe).
    var output: Int32 = STDERR_FILENO

    /// The UTC time to the second, formatted once per second (every log line needs it).
    private static func timestamp() -> String { stamp.now() }

    private static let stamp = SecondStamp(format: "%Y-%m-%dT%H:%M:%SZ")
}

/// The current UTC time in a `strftime` format, formatted at most once a second (a log line's timestamp, an HTTP
/// answer's `Date` header).
final class SecondStamp: Sendable {
    private let format: String
    private let last = Mutex<(second: time_t, text: String)>((-1, ""))

    init(format: String) { self.format = format }

    func now() -> String {
        let now = time(nil)
        if let cached = last.withLock({ $0.second == now ? $0.text : nil }) { return cached }
        var seconds = now
        var parts = tm()
        gmtime_r(&seconds, &parts)
        var buffer = [CChar](repeating: 0, count: 40)
        let count = strftime(&buffer, buffer.count, format, &parts)
        let text = String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        last.withLock { $0 = (now, text) }
        return text
    }
}
