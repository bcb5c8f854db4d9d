import AsyncHTTPClient
import CircuitFakes
import CompressNIO
import Foundation
import NIOCore
import Testing

/// The fake HEC must hold senders to Splunk's protocol, or the Splunk tests prove nothing.
@Suite(.timeLimit(.minutes(1))) struct FakeHECTests {
    struct Answer {
        var status: Int
        var json: [String: Any]
    }

    func post(
        _ hec: FakeHEC,
        _ body: String,
        path: String = "/services/collector/event",
        authorization: String? = "Splunk hec-token",
        gzip: Bool = false
    ) async throws -> Answer {
        var request = HTTPClientRequest(url: "http://127.0.0.1:\(hec.port)\(path)")
        request.method = .POST
        if let authorization { request.headers.add(name: "Authorization", value: authorization) }
        var bytes = ByteBuffer(string: body)
        if gzip {
            bytes = try bytes.compress(with: .gzip)
            request.headers.add(name: "Content-Encoding", value: "gzip")
        }
        request.body = .bytes(bytes)
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(10))
        let answer = try await response.body.collect(upTo: 1 << 20)
        let json = (try? JSONSerialization.jsonObject(with: Data(buffer: answer))) as? [String: Any] ?? [:]
        return Answer(status: Int(response.status.code), json: json)
    }

    /// Runs `body` against a fresh fake, stopping it on every path.
    func withHEC(_ settings: FakeHEC.Settings = FakeHEC.Settings(), _ body: (FakeHEC) async throws -> Void) async throws {
        let hec = try await FakeHEC.start(settings)
        do {
            try await body(hec)
        } catch {
            await hec.stop()
            throw error
        }
        await hec.stop()
    }

    static let three = #"{"time": 1.5, "event": {"n": 1}} {"event": {"n": 2}, "index": "main"}"# + "\n" + #"{"event": "three"}"#

    @Test func concatenatedEventsPlainAndGzipped() async throws {
        try await withHEC { hec in
            let plain = try await post(hec, Self.three)
            #expect(plain.status == 200 && plain.json["code"] as? Int == 0 && plain.json["text"] as? String == "Success")
            let zipped = try await post(hec, Self.three, gzip: true)
            #expect(zipped.status == 200)
            #expect(await hec.events.count == 6)
            #expect(await hec.deliveries.entries.map(\.gzipped) == [false, true])
            #expect(try await post(hec, Self.three, path: "/services/collector").status == 200)
        }
    }

    @Test func authorisationAsSplunkChecksIt() async throws {
        try await withHEC { hec in
            let missing = try await post(hec, Self.three, authorization: nil)
            #expect(missing.status == 401 && missing.json["code"] as? Int == 2)
            let scheme = try await post(hec, Self.three, authorization: "Bearer hec-token")
            #expect(scheme.status == 401 && scheme.json["code"] as? Int == 3)
            let wrong = try await post(hec, Self.three, authorization: "Splunk nope")
            #expect(wrong.status == 403 && wrong.json["code"] as? Int == 4)
            #expect(try await post(hec, Self.three, path: "/services/collector/raw").status == 404)
            #expect(await hec.events.count == 0)
        }
    }

    @Test func aBadEventIsNamedAndThoseBeforeItIndexed() async throws {
        var settings = FakeHEC.Settings()
        settings.poisonText = "poison"
        try await withHEC(settings) { hec in
            let answer = try await post(hec, #"{"event": 1} {"event": "poison"} {"event": 3}"#)
            #expect(answer.status == 400 && answer.json["code"] as? Int == 6 && answer.json["invalid-event-number"] as? Int == 1)
            #expect(await hec.events.entries == [#"{"event": 1}"#])
            let index = try await post(hec, #"{"event": 1, "index": "nope"}"#)
            #expect(index.status == 400 && index.json["code"] as? Int == 7 && index.json["invalid-event-number"] as? Int == 0)
            for (body, code) in [("", 5), (#"{"time": 1}"#, 12), (#"{"event": ""}"#, 13), (#"[{"event": 1}]"#, 6)] {
                #expect(try await post(hec, body).json["code"] as? Int == code, "\(body)")
            }
        }
    }

    @Test func tooLargeBusyAndSlow() async throws {
        var settings = FakeHEC.Settings()
        settings.maximumBodyBytes = 64
        try await withHEC(settings) { hec in
            #expect(try await post(hec, String(repeating: #"{"event": 1} "#, count: 10)).status == 413)
            hec.settings.withLockedValue { $0.failWith = (503, #"{"text": "Server is busy", "code": 9}"#) }
            let busy = try await post(hec, #"{"event": 1}"#)
            #expect(busy.status == 503 && busy.json["code"] as? Int == 9)
            #expect(await hec.events.count == 0)
        }
    }
}
