import CircuitFakes
import Foundation
import Logging
import NIOConcurrencyHelpers
import Testing

@testable import OAIToCircuit

/// Issue 4: events go through the outbox to a fake HEC that checks the protocol as Splunk does.
@Suite(.timeLimit(.minutes(2))) struct SplunkDeliveryTests {
    /// Statuses the shipper reports after each round, to await progress instead of sleeping.
    final class Progress: Sendable {
        let rounds = Journal<HECShipper.Status>()

        var tuning: @Sendable (inout HECShipper.Tuning) -> Void {
            { [rounds] tuning in
                Harness.quickRetries(&tuning)
                tuning.observe = { status in Task { await rounds.append(status) } }
            }
        }

        func sent(_ count: Int) async {
            await rounds.wait { $0.contains { $0.sent >= count } }
        }
    }

    /// Runs `body` with a fake HEC, stopped on every path.
    static func withHEC(
        _ settings: FakeHEC.Settings = FakeHEC.Settings(),
        port: Int = 0,
        _ body: (FakeHEC) async throws -> Void
    ) async throws {
        let hec = try await FakeHEC.start(settings, port: port)
        do {
            try await body(hec)
        } catch {
            await hec.stop()
            throw error
        }
        await hec.stop()
    }

    static func requestIDs(_ hec: FakeHEC) async -> [String] {
        await hec.events.entries.compactMap { (object($0)["event"] as? [String: Any])?["request_id"] as? String }
    }

    static func object(_ text: String) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
    }

    static func health(_ harness: Harness) async throws -> [String: Any] {
        let answer = try await harness.request(.GET, "/health", subkey: nil)
        return try #require(answer.json?["splunk_hec"] as? [String: Any])
    }

    @Test func usageAndErrorEventsArriveWithTheirFieldsAndLeaveTheOutbox() async throws {
        try await Self.withHEC { hec in
            let progress = Progress()
            var environment = Harness.splunk(hec)
            environment["SPLUNK_HEC_CHANNEL"] = "0C9A5C5E-8E4B-4B7A-9F8B-2B5C3D7E1A4F"
            try await Harness.with(environment: environment, hecTuning: progress.tuning) { harness in
                let answer = try await harness.chat(Harness.chatBody(), headers: [("X-Forwarded-For", "203.0.113.7")])
                #expect(answer.status == 200)
                expectError(
                    try await harness.chat(Harness.chatBody(), subkey: "sk-stranger"),
                    status: 403,
                    code: "unauthorized_subkey"
                )
                await hec.events.wait { $0.count == 2 }
                await progress.sent(2)

                let events = await hec.events.entries.map(Self.object)
                let usage = try #require(events.first { $0["sourcetype"] as? String == "llm:usage" })
                let error = try #require(events.first { $0["sourcetype"] as? String == "llm:usage:error" })
                let record = try #require(await harness.recorder.usage.entries.first)
                #expect(usage["time"] as? Double == (record.finishedAt * 1e6).rounded() / 1e6)
                #expect(usage["source"] as? String == "oai-to-circuit" && usage["index"] as? String == "main")
                #expect(usage["host"] as? String == SplunkEnvelope.hostName)
                let fields = try #require(usage["event"] as? [String: Any])
                #expect(fields["subkey"] as? String == Caller.hash(Harness.subkey))
                #expect(fields["key_id"] as? String == Caller.hash(Harness.subkey))
                #expect(fields["model"] as? String == "gpt-4o" && fields["status_code"] as? Int == 200)
                #expect(fields["success"] as? Bool == true && fields["is_streaming"] as? Bool == false)
                #expect(fields["total_tokens"] as? Int == record.usage.totalTokens && record.usage.totalTokens > 0)
                #expect(fields["request_id"] as? String == answer.headers.first(name: "X-Request-ID"))
                #expect(fields["client_ip"] as? String == "127.0.0.1")
                #expect(fields["x_forwarded_for"] as? String == "203.0.113.7")
                let errorFields = try #require(error["event"] as? [String: Any])
                #expect(errorFields["event_type"] as? String == "error")
                #expect(errorFields["error_type"] as? String == "unauthorized_subkey")
                #expect(errorFields["subkey"] as? String == Caller.hash("sk-stranger"))
                #expect(errorFields["x_forwarded_for"] as? String == "")

                let deliveries = await hec.deliveries.entries
                #expect(deliveries.allSatisfy { $0.gzipped && $0.status == 200 })
                #expect(deliveries.allSatisfy { $0.channel == "0C9A5C5E-8E4B-4B7A-9F8B-2B5C3D7E1A4F" })
                #expect(try TestDatabase.pendingSplunkEvents(harness.databasePath) == 0)
                let health = try await Self.health(harness)
                #expect(health["enabled"] as? Bool == true && health["pending"] as? Int == 0 && health["sent"] as? Int == 2)
                #expect(health["last_success"] is String && health["last_error"] is NSNull)
                let metrics = try await harness.request(.GET, "/metrics", subkey: nil).body
                #expect(metrics.contains("oai_to_circuit_splunk_events_sent_total 2"))
                #expect(metrics.contains(#"oai_to_circuit_splunk_events_queued_total{kind="error"} 1"#))
                let logs = harness.logs.all.joined(separator: "\n")
                #expect(!logs.contains("hec-token") && !logs.contains("sk-stranger"))

                // The outbox is empty now; a new event still gets an id past what the shipper has read.
                #expect(try await harness.chat(Harness.chatBody()).status == 200)
                await progress.sent(3)
            }
        }
    }

    @Test func eventsGoInBatchesWithinTheLimits() async throws {
        try await Self.withHEC { hec in
            let progress = Progress()
            var environment = Harness.splunk(hec, flushMilliseconds: 1_000)
            environment["SPLUNK_BATCH_MAX_EVENTS"] = "25"
            try await Harness.with(environment: environment, hecTuning: progress.tuning) { harness in
                try await withThrowingTaskGroup(of: Int.self) { group in
                    for _ in 0..<60 { group.addTask { try await harness.chat(Harness.chatBody()).status } }
                    for try await status in group { #expect(status == 200) }
                }
                await progress.sent(60)
                let deliveries = await hec.deliveries.entries
                #expect(deliveries.allSatisfy { $0.eventCount <= 25 && $0.status == 200 })
                #expect(deliveries.count < 60)
                #expect(deliveries.map(\.eventCount).reduce(0, +) == 60)
                let ids = await Self.requestIDs(hec)
                #expect(ids.count == 60 && Set(ids).count == 60)
            }
        }
    }

    @Test func splunkDownThenBackGetsEveryEvent() async throws {
        let refusing = try RefusingPort()
        let url = "http://127.0.0.1:\(refusing.port)/services/collector/event"
        let progress = Progress()
        let hec = NIOLockedValueBox<FakeHEC?>(nil)
        defer { if let hec = hec.withLockedValue({ $0 }) { Task { await hec.stop() } } }
        let environment = ["SPLUNK_HEC_URL": url, "SPLUNK_HEC_TOKEN": "hec-token", "SPLUNK_FLUSH_INTERVAL_MS": "20"]
        try await Harness.with(environment: environment, hecTuning: progress.tuning) { harness in
            for _ in 0..<10 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
            await progress.rounds.wait { $0.contains { $0.lastError != nil } }
            let failing = try await Self.health(harness)
            #expect(failing["pending"] as? Int == 10)
            #expect((failing["last_error"] as? String)?.contains("connect") == true)
            // Two more while it is down, then Splunk comes back on the same port.
            for _ in 0..<2 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
            refusing.release()
            let started = try await FakeHEC.start(port: refusing.port)
            hec.withLockedValue { $0 = started }
            await progress.sent(12)
            // Connections were refused, so nothing can have arrived twice.
            let delivered = await Self.requestIDs(started)
            #expect(delivered.count == 12)
            #expect(Set(delivered) == Set(await harness.recorder.usage.entries.map(\.requestID)))
            #expect(try TestDatabase.pendingSplunkEvents(harness.databasePath) == 0)
            let metrics = try await harness.request(.GET, "/metrics", subkey: nil).body
            #expect(metrics.contains("oai_to_circuit_splunk_events_retried_total"))
            await started.stop()
            hec.withLockedValue { $0 = nil }
        }
    }

    @Test func busySplunkIsRetriedUntilItAccepts() async throws {
        var settings = FakeHEC.Settings()
        settings.failWith = (503, #"{"text": "Server is busy", "code": 9}"#)
        try await Self.withHEC(settings) { hec in
            let progress = Progress()
            try await Harness.with(environment: Harness.splunk(hec), hecTuning: progress.tuning) { harness in
                for _ in 0..<3 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
                await hec.deliveries.wait { $0.filter { $0.status == 503 }.count >= 2 }
                let health = try await Self.health(harness)
                #expect((health["last_error"] as? String)?.contains("503") == true)
                #expect(health["paused"] is NSNull)
                hec.settings.withLockedValue { $0.failWith = nil }
                await hec.events.wait { $0.count >= 3 }
                await progress.sent(3)
                #expect(await hec.events.count == 3)
                #expect(harness.logs.all.contains { $0.contains("Splunk accepts events again") })
            }
        }
    }

    @Test func aSlowSplunkDoesNotHoldChatAnswers() async throws {
        var settings = FakeHEC.Settings()
        settings.delay = .seconds(5)
        try await Self.withHEC(settings) { hec in
            var environment = Harness.splunk(hec)
            environment["SPLUNK_HEC_TIMEOUT_SECONDS"] = "20"
            // The bridge's own read timeout for Circuit is shorter than Splunk's answer: it must not apply to Splunk.
            environment["UPSTREAM_TIMEOUT_SECONDS"] = "2"
            let progress = Progress()
            try await Harness.with(environment: environment, hecTuning: progress.tuning) { (harness: Harness) async throws in
                #expect(try await harness.chat(Harness.chatBody()).status == 200)
                await hec.arrivals.wait { $0.count >= 1 }
                // Splunk holds that batch for five seconds; answers go on meanwhile.
                for _ in 0..<20 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
                #expect(await hec.deliveries.count == 0)
                await progress.sent(21)
                // Each event once: no batch timed out and went again.
                let deliveries = await hec.deliveries.entries
                #expect(deliveries.map(\.eventCount).reduce(0, +) == 21 && deliveries.allSatisfy { $0.status == 200 })
                #expect(await hec.events.count == 21)
            }
        }
    }

    @Test func aMalformedEventIsSetAsideAndTheRestDelivered() async throws {
        var settings = FakeHEC.Settings()
        settings.poisonText = "poison-request"
        try await Self.withHEC(settings) { hec in
            let progress = Progress()
            var environment = Harness.splunk(hec, flushMilliseconds: 60_000)
            environment["SPLUNK_BATCH_MAX_EVENTS"] = "5"
            try await Harness.with(environment: environment, hecTuning: progress.tuning) { harness in
                // The shipper has looked once (and found nothing); five answers then make one full batch, whose
                // third event is one Splunk refuses.
                await progress.rounds.wait { !$0.isEmpty }
                for index in 0..<5 {
                    let id = index == 2 ? "poison-request" : "request-\(index)"
                    #expect(try await harness.chat(Harness.chatBody(), headers: [("X-Request-ID", id)]).status == 200)
                }
                await progress.rounds.wait { $0.contains { $0.deadLettered == 1 && $0.sent == 4 } }
                #expect(await Self.requestIDs(hec) == ["request-0", "request-1", "request-3", "request-4"])
                let deliveries = await hec.deliveries.entries
                #expect(deliveries.map(\.status) == [400, 200] && deliveries.map(\.eventCount) == [5, 2])
                let dead = try TestDatabase.rows(harness.databasePath, "SELECT kind, event, answer FROM splunk_dead_letter")
                #expect(dead.count == 1)
                let event: Data = try #require(dead.first?["event"])
                #expect(String(decoding: event, as: UTF8.self).contains("poison-request"))
                #expect((dead.first?["answer"] as String?)?.contains(#""invalid-event-number": 2"#) == true)
                #expect(try TestDatabase.pendingSplunkEvents(harness.databasePath) == 0)
                let health = try await Self.health(harness)
                #expect(health["dead_lettered"] as? Int == 1)
            }
        }
    }

    @Test func whatSplunkDidNotTakeShipsAfterARestart() async throws {
        try await Self.withHEC { hec in
            let directory = try Harness.temporaryDirectory()
            defer { try? FileManager.default.removeItem(at: directory) }
            let progress = Progress()
            var requestIDs: Set<String> = []
            // A wrong token pauses delivery: everything is kept, and /health says why.
            try await Harness.with(
                environment: Harness.splunk(hec, token: "wrong-token"),
                directory: directory,
                hecTuning: progress.tuning
            ) { harness in
                for _ in 0..<8 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
                await progress.rounds.wait { $0.contains { $0.paused != nil } }
                let health = try await Self.health(harness)
                #expect((health["paused"] as? String)?.contains("SPLUNK_HEC_TOKEN") == true)
                #expect(health["pending"] as? Int == 8)
                requestIDs = Set(await harness.recorder.usage.entries.map(\.requestID))
                let logs = harness.logs.all.joined(separator: "\n")
                #expect(logs.contains("Splunk delivery paused") && !logs.contains("wrong-token"))
            }
            #expect(await hec.events.count == 0)
            #expect(
                try TestDatabase.pendingSplunkEvents(directory.appendingPathComponent("quota.db").path) == 8
            )
            let after = Progress()
            try await Harness.with(environment: Harness.splunk(hec), directory: directory, hecTuning: after.tuning) {
                (harness: Harness) async throws in
                await after.sent(8)
                let delivered = await Self.requestIDs(hec)
                #expect(delivered.count == 8 && Set(delivered) == requestIDs)
                #expect(try TestDatabase.pendingSplunkEvents(harness.databasePath) == 0)
            }
        }
    }

    @Test func aPausedDeliveryResumesOnceTheTokenIsRight() async throws {
        var settings = FakeHEC.Settings()
        settings.token = "rotated-token"
        try await Self.withHEC(settings) { hec in
            let progress = Progress()
            try await Harness.with(environment: Harness.splunk(hec), hecTuning: progress.tuning) { harness in
                for _ in 0..<3 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
                await progress.rounds.wait { $0.contains { $0.paused != nil } }
                // Splunk's side is fixed (the token the bridge has is accepted again): delivery resumes by itself.
                hec.settings.withLockedValue { $0.token = "hec-token" }
                await progress.sent(3)
                let health = try await Self.health(harness)
                #expect(health["paused"] is NSNull && health["pending"] as? Int == 0)
                #expect(await hec.events.count == 3)
            }
        }
    }

    @Test func aBatchTooLargeForSplunkIsSplit() async throws {
        var settings = FakeHEC.Settings()
        // Room for two events of about 600 bytes in one request, not five.
        settings.maximumBodyBytes = 1_400
        try await Self.withHEC(settings) { hec in
            let progress = Progress()
            var environment = Harness.splunk(hec, flushMilliseconds: 60_000)
            environment["SPLUNK_BATCH_MAX_EVENTS"] = "5"
            try await Harness.with(environment: environment, hecTuning: progress.tuning) { harness in
                await progress.rounds.wait { !$0.isEmpty }
                for _ in 0..<5 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
                await progress.sent(5)
                let deliveries = await hec.deliveries.entries
                #expect(deliveries.first?.status == 413)
                #expect(deliveries.filter { $0.status == 200 }.map(\.eventCount).reduce(0, +) == 5)
                #expect(Set(await Self.requestIDs(hec)) == Set(await harness.recorder.usage.entries.map(\.requestID)))
                let health = try await Self.health(harness)
                #expect(health["dead_lettered"] as? Int == 0)
            }
        }
    }

    @Test func shutdownSendsWhatIsLeft() async throws {
        try await Self.withHEC { hec in
            // A minute between flushes and batches of 500: nothing would go before shutdown but for the drain.
            try await Harness.with(environment: Harness.splunk(hec, flushMilliseconds: 60_000)) {
                (harness: Harness) async throws in
                for _ in 0..<3 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
            }
            #expect(await hec.events.count == 3)
        }
    }

    @Test func refusalsAloneCannotFillTheSpool() async throws {
        let spool = SplunkSpool(maximumEvents: 100, batchSize: 500)
        #expect(spool.usageLimit == 90 && spool.errorLimit == 10)
        for _ in 0..<10 { #expect(spool.reserve(.error).accepted) }
        #expect(spool.reserve(.error) == (false, true))
        #expect(spool.reserve(.error) == (false, false))
        #expect(spool.reserve(.usage).accepted)
        spool.release(usage: 0, errors: 1)
        #expect(spool.reserve(.error).accepted)
        #expect(spool.reserve(.error) == (false, true))
        #expect(spool.counts == SplunkSpool.Counts(pendingUsage: 1, pendingErrors: 10, droppedUsage: 0, droppedErrors: 3))
    }

    @Test func theDoorbellRingsOnceAFullBatchIsCommitted() async {
        let spool = SplunkSpool(maximumEvents: 1_000, batchSize: 10)
        #expect(!spool.committed(9))
        #expect(spool.committed(1))
        #expect(!spool.committed(5))  // already past a batch: no second ring
        await spool.doorbell.wait(timeout: .seconds(3600))  // rung while nobody waited: returns at once
        #expect(spool.takeUnread() == 15)
        spool.restore(20)  // a failed read puts its count back without ringing
        #expect(!spool.committed(1))
        #expect(spool.takeUnread() == 21)
        #expect(spool.committed(10))
    }

    @Test func aFullSpoolDropsNewEventsAndCountsThem() async throws {
        try await Self.withHEC { hec in
            let smallSpool: (inout BridgeConfiguration) -> Void = { $0.splunk.spoolMaxEvents = 10 }
            try await Harness.with(environment: Harness.splunk(hec, token: "wrong-token"), adjust: smallSpool) { harness in
                // Nine places for usage events, one for error events.
                for _ in 0..<12 { #expect(try await harness.chat(Harness.chatBody()).status == 200) }
                for _ in 0..<3 {
                    expectError(
                        try await harness.chat(Harness.chatBody(), subkey: "sk-stranger"),
                        status: 403,
                        code: "unauthorized_subkey"
                    )
                }
                let health = try await Self.health(harness)
                #expect(health["pending_usage"] as? Int == 9 && health["dropped_usage"] as? Int == 3)
                #expect(health["pending_errors"] as? Int == 1 && health["dropped_errors"] as? Int == 2)
                let metrics = try await harness.request(.GET, "/metrics", subkey: nil).body
                #expect(metrics.contains(#"oai_to_circuit_splunk_events_dropped_total{kind="usage"} 3"#))
                #expect(metrics.contains(#"oai_to_circuit_splunk_events_dropped_total{kind="error"} 2"#))
                // The usage itself is all there.
                #expect(try TestDatabase.usage(harness.databasePath, subkey: Harness.subkey, model: "gpt-4o")?.requests == 12)
                #expect(try TestDatabase.pendingSplunkEvents(harness.databasePath) == 10)
                #expect(harness.logs.all.contains { $0.contains("Splunk spool is full") })
            }
        }
    }
}

extension SplunkDeliveryTests {
    /// The ledger as the shipper's outbox, noting each time it is told how far the request log is settled, with how
    /// many events Splunk had indexed by then.
    final class RecordingOutbox: SplunkOutbox {
        let store: SQLiteLedger
        let hec: FakeHEC
        let settlements = Journal<[Int64]>()

        init(store: SQLiteLedger, hec: FakeHEC) {
            self.store = store
            self.hec = hec
        }

        func pendingEvents(after id: Int64, limit: Int) async throws -> [PendingEvent] {
            try await store.pendingEvents(after: id, limit: limit)
        }

        func delivered(_ ids: ClosedRange<Int64>) async throws { try await store.delivered(ids) }

        func settled(through id: Int64) async throws {
            await settlements.append([id, Int64(await hec.events.count)])
            try await store.settled(through: id)
        }

        func deadLetter(_ event: PendingEvent, answer: String, at time: Double) async throws {
            try await store.deadLetter(event, answer: answer, at: time)
        }

        func outboxCounts() async throws -> OutboxCounts { try await store.outboxCounts() }
    }

    /// Splunk may take later batches while an earlier one waits for a retry. The request log's cursor stays below the
    /// earlier one until Splunk has it too, so that a restart in between sends it again instead of losing it.
    @Test func theLogCursorWaitsForABatchBeingRetried() async throws {
        try await Self.withHEC { hec in
            let directory = try Harness.temporaryDirectory()
            defer { try? FileManager.default.removeItem(at: directory) }
            let path = directory.appendingPathComponent("quota.db").path
            let store = try SQLiteLedger.open(path: path)
            let entries = (0..<8).map { index in
                var entry = LedgerTests.entry(model: "m\(index)")
                entry.hasUsageEvent = true
                return entry
            }
            _ = try await store.commit(entries, events: [], purgingLogBefore: nil, purgeLimit: 0)
            let last = try #require(try await store.pendingEvents(after: 0, limit: 10).last?.id)
            // The first of four batches is turned away once; the three others go in meanwhile.
            hec.settings.withLockedValue { $0.busyText = entries[0].requestID }
            let settings = try BridgeConfiguration(environment: ["SPLUNK_HEC_URL": hec.url, "SPLUNK_HEC_TOKEN": "hec-token"])
                .splunk
            let client = try #require(HECClient(settings))
            var tuning = HECShipper.Tuning()
            tuning.maximumEvents = 2
            tuning.inFlight = 4
            tuning.firstRetry = .milliseconds(50)
            let outbox = RecordingOutbox(store: store, hec: hec)
            let shipper = HECShipper(
                client: client,
                outbox: outbox,
                spool: nil,
                envelope: SplunkEnvelope(settings),
                tuning: tuning,
                metrics: nil,
                logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
            )
            let outcome = await shipper.ship(maximumFailures: 5)
            await client.shutdown()
            #expect(outcome.sent == 8 && outcome.failure == nil)
            #expect(await hec.deliveries.entries.map(\.status).sorted() == [200, 200, 200, 200, 503])
            // Told once, when Splunk had all eight.
            #expect(await outbox.settlements.entries == [[last, 8]])
            #expect(try TestDatabase.pendingSplunkEvents(path) == 0)
            try await store.close()
        }
    }
}
