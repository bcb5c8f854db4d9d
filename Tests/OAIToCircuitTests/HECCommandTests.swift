import ArgumentParser
import CircuitFakes
import Foundation
import Logging
import Testing

@testable import OAIToCircuit

/// `hec test` and `hec replay` against the fake HEC.
@Suite(.timeLimit(.minutes(1))) struct HECCommandTests {
    static func settings(url: String, token: String = "hec-token") throws -> BridgeConfiguration.Splunk {
        try BridgeConfiguration(environment: ["SPLUNK_HEC_URL": url, "SPLUNK_HEC_TOKEN": token]).splunk
    }

    @Test func testSendsOneEventAndExplainsTheAnswer() async throws {
        let hec = try await FakeHEC.start()
        defer { Task { await hec.stop() } }
        let good = await HECProbe.run(try Self.settings(url: hec.url), now: 1_795_945_845)
        #expect(good.delivered)
        #expect(good.text.contains("Splunk answered 200"))
        #expect(
            good.text.contains(#"ok: Splunk indexed the test event; search for it with index=main sourcetype="llm:usage:test""#)
        )
        let event = try #require(await hec.events.entries.first)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(event.utf8)) as? [String: Any])
        #expect(object["sourcetype"] as? String == "llm:usage:test")
        #expect((object["event"] as? [String: Any])?["event_type"] as? String == "test")

        let badToken = await HECProbe.run(try Self.settings(url: hec.url, token: "not-the-token"), now: 0)
        #expect(!badToken.delivered)
        #expect(badToken.text.contains("Splunk answered 403"))
        #expect(badToken.text.contains("problem: bad token: Splunk does not know SPLUNK_HEC_TOKEN"))
        #expect(!badToken.text.contains("not-the-token"))

        let wrongPath = await HECProbe.run(try Self.settings(url: "http://127.0.0.1:\(hec.port)/services/other"), now: 0)
        #expect(wrongPath.text.contains("problem: wrong URL or path"))

        let tls = await HECProbe.run(try Self.settings(url: "https://127.0.0.1:\(hec.port)"), now: 0)
        #expect(!tls.delivered)
        #expect(tls.text.contains("problem: TLS failure"), "\(tls.text)")

        let refusing = try RefusingPort()
        let nobody = await HECProbe.run(try Self.settings(url: "http://127.0.0.1:\(refusing.port)"), now: 0)
        #expect(nobody.text.contains("problem: nothing accepts connections there"), "\(nobody.text)")
        #expect(await hec.events.count == 1)
    }

    @Test func testCommandExitsOneOnABadTokenAndSeventyEightWithoutSettings() async throws {
        let hec = try await FakeHEC.start()
        defer { Task { await hec.stop() } }
        let directory = try Harness.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let envFile = directory.appendingPathComponent("credentials.env")
        try "SPLUNK_HEC_URL=\(hec.url)\nSPLUNK_HEC_TOKEN=wrong\n".write(to: envFile, atomically: true, encoding: .utf8)
        var command =
            try OAIToCircuitCommand.parseAsRoot(["hec", "test", "--env-file", envFile.path]) as! any AsyncParsableCommand
        await #expect(throws: ExitCode.failure) { try await command.run() }
        try "SPLUNK_HEC_URL=\(hec.url)\n".write(to: envFile, atomically: true, encoding: .utf8)
        command = try OAIToCircuitCommand.parseAsRoot(["hec", "test", "--env-file", envFile.path]) as! any AsyncParsableCommand
        await #expect(throws: ExitCode(78)) { try await command.run() }
    }

    @Test func replayResendsUsageFromTheRequestLogMarkedAsBackfill() async throws {
        let hec = try await FakeHEC.start()
        defer { Task { await hec.stop() } }
        try await Harness.with { harness in
            for _ in 0..<3 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
            let records = await harness.recorder.usage.entries
            let ledger = try SQLiteLedger.open(path: harness.databasePath, readOnly: true)
            defer { Task { try? await ledger.close() } }
            let day = PeriodCalendar.day(records[0].finishedAt)
            let span = (since: Double(day) * 86_400, until: Double(day + 1) * 86_400)
            let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
            let outcome = await HECReplay.run(
                try Self.settings(url: hec.url),
                ledger: ledger,
                since: span.since,
                until: span.until,
                logger: logger
            )
            #expect(outcome.sent == 3 && outcome.failure == nil)
            let events = await hec.events.entries.compactMap {
                try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
            }
            #expect(events.map { ($0["event"] as? [String: Any])?["backfill"] as? Bool } == [true, true, true])
            #expect(
                events.map { ($0["event"] as? [String: Any])?["request_id"] as? String } == records.map { $0.requestID }
            )
            #expect(events.map { $0["time"] as? Double } == records.map { ($0.finishedAt * 1e6).rounded() / 1e6 })

            // Another day has nothing; a bad token stops at once with the reason.
            let none = await HECReplay.run(
                try Self.settings(url: hec.url),
                ledger: ledger,
                since: span.until,
                until: span.until + 86_400,
                logger: logger
            )
            #expect(none.sent == 0 && none.failure == nil)
            let refused = await HECReplay.run(
                try Self.settings(url: hec.url, token: "wrong"),
                ledger: ledger,
                since: span.since,
                until: span.until,
                logger: logger
            )
            #expect(refused.sent == 0 && refused.failure?.contains("SPLUNK_HEC_TOKEN") == true)
        }
    }
}
