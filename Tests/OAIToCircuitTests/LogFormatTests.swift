import Foundation
import Logging
import Testing

@testable import OAIToCircuit

#if canImport(Glibc)
import Glibc
#endif

/// What the log lines look like on a terminal or a file, and under journald.
@Suite struct LogFormatTests {
    /// The lines a handler writes for a warning and an info line, read back through a pipe.
    static func lines(journal: Bool) throws -> [String] {
        var ends: [Int32] = [0, 0]
        guard pipe(&ends) == 0 else { throw POSIXError(.EMFILE) }
        defer { close(ends[0]) }
        var handler = LineLogHandler(label: "test", journal: journal)
        handler.output = ends[1]
        let logger = Logger(label: "test") { _ in handler }
        logger.warning("quota policy rejected", metadata: ["source": "quotas.json"])
        logger.info("request", metadata: ["status": "200", "path": "/v1/models"])
        close(ends[1])
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = read(ends[0], &buffer, buffer.count)
            if count <= 0 { break }
            bytes += buffer.prefix(count)
        }
        #expect(!bytes.contains(0x1B), "no ANSI escape sequences")
        return String(decoding: bytes, as: UTF8.self).split(separator: "\n").map(String.init)
    }

    @Test func journaldGetsPriorityPrefixesAndNoTimestamp() throws {
        #expect(
            try Self.lines(journal: true) == [
                "<4>quota policy rejected source=quotas.json", "<6>request path=/v1/models status=200",
            ]
        )
        #expect(LineLogHandler.priority(.critical) == 2 && LineLogHandler.priority(.error) == 3)
        #expect(LineLogHandler.priority(.notice) == 5 && LineLogHandler.priority(.trace) == 7)
    }

    @Test func elsewhereLinesStartWithAUTCTimestamp() throws {
        let lines = try Self.lines(journal: false)
        #expect(lines.count == 2)
        #expect(
            lines[0].wholeMatch(of: /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ warning quota policy rejected source=quotas.json/) != nil
        )
    }
}
