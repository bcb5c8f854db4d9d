import CompressNIO
import Foundation
import HTTPTypes
import Hummingbird
import NIOConcurrencyHelpers
import NIOCore

/// Splunk's HTTP Event Collector as a sender meets it, checking the protocol the way Splunk does: `POST
/// /services/collector/event` (or `/services/collector`), `Authorization: Splunk <token>`, optional gzip
/// (`Content-Encoding: gzip`), a body of concatenated JSON event objects (no array), each with a non-empty `event`
/// and, if it names one, a known `index`. Answers are Splunk's JSON (`{"text": …, "code": …}`, with
/// `invalid-event-number` when one event is bad: the events before it are indexed, it and those after are not).
public final class FakeHEC: Sendable {
    public struct Settings: Sendable {
        public var token = "hec-token"
        public var indexes: Set<String> = ["main"]
        /// Bodies larger than this (after decompression) are refused with 413.
        public var maximumBodyBytes = 1 << 20
        /// When set, every request gets this status and body (503 busy, 500…), with nothing indexed.
        public var failWith: (status: Int, body: String)?
        /// Held before answering (a slow Splunk).
        public var delay: Duration = .zero
        /// An event whose JSON contains this text is refused as malformed (code 6 with its number).
        public var poisonText: String?
        /// A request holding an event whose JSON contains this text is answered 503 busy (code 9), nothing indexed,
        /// `busyTimes` times; then it is taken like any other.
        public var busyText: String?
        public var busyTimes = 1
        /// A file each indexed event is appended to, one JSON line each (for scripts that run the fake apart).
        public var eventLog: String?
        public init() {}
    }

    /// What one request brought.
    public struct Delivery: Sendable {
        public var status: Int
        public var gzipped: Bool
        public var channel: String?
        /// How many events the request held, indexed or not.
        public var eventCount: Int
    }

    public let settings: NIOLockedValueBox<Settings>
    /// Every event Splunk would have indexed, as the JSON text it was sent as.
    public let events: Journal<String>
    public let deliveries: Journal<Delivery>
    /// One entry per request as it arrives, before any `delay` (to see a request Splunk has not answered yet).
    public let arrivals: Journal<Int>
    private let server: FakeServer

    public var url: String { "http://127.0.0.1:\(server.port)/services/collector/event" }
    public var port: Int { server.port }

    /// `port` 0 takes any free one.
    public static func start(_ settings: Settings = Settings(), port: Int = 0) async throws -> FakeHEC {
        let box = NIOLockedValueBox(settings)
        let events = Journal<String>()
        let deliveries = Journal<Delivery>()
        let arrivals = Journal<Int>()
        let responder = CallbackResponder<BasicRequestContext> { request, _ in
            let current = box.withLockedValue { $0 }
            await arrivals.append(await arrivals.count + 1)
            let gzipped = request.headers[.contentEncoding]?.lowercased() == "gzip"
            let channel = request.headers[HTTPField.Name("X-Splunk-Request-Channel")!]
            var answer = try await Self.answer(request, settings: current, gzipped: gzipped)
            if answer.busy {
                box.withLockedValue { settings in
                    settings.busyTimes -= 1
                    if settings.busyTimes <= 0 { settings.busyText = nil }
                }
            }
            if current.delay > .zero { try await Task.sleep(for: current.delay) }
            if let failure = current.failWith {
                answer = (failure.status, failure.body, answer.events, [], false)
            }
            for event in answer.indexed { await events.append(event) }
            if let path = current.eventLog, !answer.indexed.isEmpty {
                Self.append(answer.indexed.map { $0 + "\n" }.joined(), to: path)
            }
            await deliveries.append(
                Delivery(status: answer.status, gzipped: gzipped, channel: channel, eventCount: answer.events)
            )
            return Response(
                status: .init(code: answer.status),
                headers: [.contentType: "application/json; charset=UTF-8"],
                body: ResponseBody(byteBuffer: ByteBuffer(string: answer.body))
            )
        }
        let server = try await FakeServer.start(responder, port: port)
        return FakeHEC(settings: box, events: events, deliveries: deliveries, arrivals: arrivals, server: server)
    }

    private init(
        settings: NIOLockedValueBox<Settings>,
        events: Journal<String>,
        deliveries: Journal<Delivery>,
        arrivals: Journal<Int>,
        server: FakeServer
    ) {
        self.settings = settings
        self.events = events
        self.deliveries = deliveries
        self.arrivals = arrivals
        self.server = server
    }

    public func stop() async { await server.stop() }

    private static func append(_ text: String, to path: String) {
        if !FileManager.default.fileExists(atPath: path) { FileManager.default.createFile(atPath: path, contents: nil) }
        guard let file = FileHandle(forWritingAtPath: path) else { return }
        defer { try? file.close() }
        _ = try? file.seekToEnd()
        try? file.write(contentsOf: Data(text.utf8))
    }

    private static func splunk(_ status: Int, _ text: String, code: Int, event: Int? = nil) -> (Int, String) {
        let number = event.map { #", "invalid-event-number": \#($0)"# } ?? ""
        return (status, #"{"text": "\#(text)", "code": \#(code)\#(number)}"#)
    }

    /// Status, body, how many events the request held, those indexed, and whether it was turned away as busy.
    private static func answer(
        _ request: Request,
        settings: Settings,
        gzipped: Bool
    ) async throws -> (status: Int, body: String, events: Int, indexed: [String], busy: Bool) {
        let path = request.uri.path
        guard path == "/services/collector/event" || path == "/services/collector" else {
            let (status, body) = splunk(404, "The requested URL was not found on this server.", code: 404)
            return (status, body, 0, [], false)
        }
        guard request.method == .post else {
            let (status, body) = splunk(405, "Method not allowed", code: 405)
            return (status, body, 0, [], false)
        }
        guard let authorization = request.headers[.authorization] else {
            let (status, body) = splunk(401, "Token is required", code: 2)
            return (status, body, 0, [], false)
        }
        let parts = authorization.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "splunk" else {
            let (status, body) = splunk(401, "Invalid authorization", code: 3)
            return (status, body, 0, [], false)
        }
        guard parts[1] == settings.token else {
            let (status, body) = splunk(403, "Invalid token", code: 4)
            return (status, body, 0, [], false)
        }
        var body = try await request.body.collect(upTo: 64 << 20)
        if gzipped {
            guard let inflated = try? body.decompress(with: .gzip) else {
                let (status, text) = splunk(400, "Invalid data format", code: 6)
                return (status, text, 0, [], false)
            }
            body = inflated
        }
        guard body.readableBytes <= settings.maximumBodyBytes else {
            let (status, text) = splunk(413, "Content too large", code: 27)
            return (status, text, 0, [], false)
        }
        let objects = Self.split(Array(body.readableBytesView))
        guard !objects.isEmpty else {
            let (status, text) = splunk(400, "No data", code: 5)
            return (status, text, 0, [], false)
        }
        if let busy = settings.busyText,
            objects.contains(where: { $0.map { String(decoding: $0, as: UTF8.self).contains(busy) } == true })
        {
            let (status, text) = splunk(503, "Server is busy", code: 9)
            return (status, text, objects.count, [], true)
        }
        var indexed: [String] = []
        for (number, object) in objects.enumerated() {
            let refusal: (Int, String)?
            if let object, let text = String(bytes: object, encoding: .utf8),
                let parsed = (try? JSONSerialization.jsonObject(with: Data(object))) as? [String: Any]
            {
                if settings.poisonText.map({ text.contains($0) }) == true {
                    refusal = splunk(400, "Invalid data format", code: 6, event: number)
                } else if parsed["event"] == nil {
                    refusal = splunk(400, "Event field is required", code: 12, event: number)
                } else if let event = parsed["event"] as? String, event.isEmpty {
                    refusal = splunk(400, "Event field cannot be blank", code: 13, event: number)
                } else if let index = parsed["index"] as? String, !settings.indexes.contains(index) {
                    refusal = splunk(400, "Incorrect index", code: 7, event: number)
                } else {
                    indexed.append(text)
                    refusal = nil
                }
            } else {
                refusal = splunk(400, "Invalid data format", code: 6, event: number)
            }
            if let (status, text) = refusal { return (status, text, objects.count, indexed, false) }
        }
        let (status, text) = splunk(200, "Success", code: 0)
        return (status, text, objects.count, indexed, false)
    }

    /// Splits concatenated JSON objects (whitespace between them allowed); `nil` for a piece that is not one.
    static func split(_ bytes: [UInt8]) -> [[UInt8]?] {
        var objects: [[UInt8]?] = []
        var index = 0
        while index < bytes.count {
            while index < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[index]) { index += 1 }
            guard index < bytes.count else { break }
            guard bytes[index] == UInt8(ascii: "{") else {
                objects.append(nil)
                break
            }
            let start = index
            var depth = 0
            var inString = false
            var escaped = false
            while index < bytes.count {
                let byte = bytes[index]
                index += 1
                if inString {
                    if escaped {
                        escaped = false
                    } else if byte == UInt8(ascii: "\\") {
                        escaped = true
                    } else if byte == UInt8(ascii: "\"") {
                        inString = false
                    }
                } else if byte == UInt8(ascii: "\"") {
                    inString = true
                } else if byte == UInt8(ascii: "{") {
                    depth += 1
                } else if byte == UInt8(ascii: "}") {
                    depth -= 1
                    if depth == 0 { break }
                }
            }
            objects.append(depth == 0 ? Array(bytes[start..<index]) : nil)
            if depth != 0 { break }
        }
        return objects
    }
}
