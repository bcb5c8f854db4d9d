import Foundation
import HTTPTypes
import Hummingbird
import NIOConcurrencyHelpers
import NIOCore

/// Circuit's chat API as the bridge sees it, checking the protocol the way the real service does: the deployment
/// path, `api-version`, JSON headers, an `api-key` the token endpoint issued, and a `user` string carrying an
/// `appkey`. What it answers depends on the deployment (model) name:
///
/// - any model: a chat completion (JSON, or SSE when `"stream": true`) with usage 11 + 7 (stream: 11 + 4);
/// - `slow-headers`: waits `headerDelay` before answering; streamed, it then behaves as `endless-stream`;
/// - `slow-stream`: `chunkCount` content chunks, `chunkGap` apart;
/// - `gated-stream`: the first chunk, then waits for `openGate()` before the rest;
/// - `late-stream`: the head alone, then waits for `openGate()` before any event;
/// - `endless-stream`: a chunk every `chunkGap` until the client goes away (at most 10 000);
/// - `flood-stream`: 10 000 chunks of 4 KiB each, as fast as the bridge takes them (40 MB, more than any socket
///   buffers between a client that stops reading and the bridge);
/// - `stall-stream`: the first chunk, then silence for `headerDelay`;
/// - `broken-stream`: the first chunk and half of the next line, then silence for `headerDelay`;
/// - `crlf-stream`: CRLF line ends and `data:` without a space;
/// - `bad-request`: Azure's 400 error;
/// - `text-error`: a 503 in plain text, as a proxy in front of Circuit might send.
public final class FakeCircuit: Sendable {
    public struct Settings: Sendable {
        public var appKey = "test-appkey"
        public var headerDelay: Duration = .seconds(5)
        public var chunkGap: Duration = .milliseconds(50)
        public var chunkCount = 10
        /// Refuse every token with 401, as Circuit does when the client's credentials are revoked.
        public var refuseEveryToken = false
        /// Keep every request in `requests` (tests read them; a long benchmark run would only grow memory).
        public var recordsRequests = true
        public init() {}
    }

    public struct RecordedRequest: Sendable {
        public var method: String
        public var path: String
        public var query: String
        /// Keyed by lower-case name.
        public var headers: [String: String]
        public var body: [UInt8]
        public var json: [String: any Sendable]? {
            (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: any Sendable]
        }
    }

    public struct StreamOutcome: Sendable, Equatable {
        public var model: String
        /// `false` when the client went away before the stream ended.
        public var completed: Bool
        public init(model: String, completed: Bool) {
            self.model = model
            self.completed = completed
        }
    }

    public let settings: NIOLockedValueBox<Settings>
    public let requests: Journal<RecordedRequest>
    public let streams: Journal<StreamOutcome>
    private let gate: Gate
    private let server: FakeServer

    public static func start(tokens: FakeTokenEndpoint?, settings: Settings = Settings()) async throws -> FakeCircuit {
        let box = NIOLockedValueBox(settings)
        let requests = Journal<RecordedRequest>()
        let streams = Journal<StreamOutcome>()
        let gate = Gate()
        let responder = CallbackResponder<BasicRequestContext> { request, _ in
            let body = try await request.body.collect(upTo: 64 << 20)
            var headers: [String: String] = [:]
            for field in request.headers { headers[field.name.canonicalName] = field.value }
            let recorded = RecordedRequest(
                method: request.method.rawValue,
                path: request.uri.path,
                query: request.uri.query ?? "",
                headers: headers,
                body: Array(buffer: body)
            )
            let current = box.withLockedValue { $0 }
            if current.recordsRequests { await requests.append(recorded) }
            return try await answer(recorded, settings: current, tokens: tokens, streams: streams, gate: gate)
        }
        let server = try await FakeServer.start(responder)
        return FakeCircuit(server: server, settings: box, requests: requests, streams: streams, gate: gate)
    }

    private init(
        server: FakeServer,
        settings: NIOLockedValueBox<Settings>,
        requests: Journal<RecordedRequest>,
        streams: Journal<StreamOutcome>,
        gate: Gate
    ) {
        self.server = server
        self.settings = settings
        self.requests = requests
        self.streams = streams
        self.gate = gate
    }

    public var baseURL: String { server.baseURL }
    public var port: Int { server.port }

    /// Lets `gated-stream` send the rest of its chunks.
    public func openGate() async { await gate.open() }

    public func stop() async { await server.stop() }

    // MARK: Answers

    private static func answer(
        _ request: RecordedRequest,
        settings: Settings,
        tokens: FakeTokenEndpoint?,
        streams: Journal<StreamOutcome>,
        gate: Gate
    ) async throws -> Response {
        let parts = request.path.split(separator: "/", omittingEmptySubsequences: false)
        guard request.method == "POST", parts.count == 6, parts[1] == "openai", parts[2] == "deployments",
            parts[4] == "chat", parts[5] == "completions"
        else {
            return error(404, code: "404", "Resource not found")
        }
        let model = String(parts[3])
        guard request.query.split(separator: "&").contains(where: { $0.hasPrefix("api-version=") && $0.count > 12 }) else {
            return error(404, code: "404", "Resource not found")
        }
        guard let key = request.headers["api-key"], !settings.refuseEveryToken, tokens?.isValid(key) ?? true else {
            return error(401, code: "401", "Access denied due to invalid subscription key or wrong API endpoint.")
        }
        guard request.headers["content-type"]?.hasPrefix("application/json") == true else {
            return error(415, code: "UnsupportedMediaType", "Content-Type must be application/json")
        }
        guard let body = request.json else { return error(400, code: "BadRequest", "Invalid JSON body") }
        guard let user = body["user"] as? String,
            let userObject = (try? JSONSerialization.jsonObject(with: Data(user.utf8))) as? [String: Any],
            let appKey = userObject["appkey"] as? String, appKey == settings.appKey
        else {
            return error(401, code: "401", "Invalid or missing appkey in user")
        }
        if model == "bad-request" {
            return error(400, code: "invalid_request", "Azure rejected this request")
        }
        if model == "text-error" {
            return Response(
                status: .serviceUnavailable,
                headers: [.contentType: "text/plain", HTTPField.Name("x-ratelimit-reset-requests")!: "7s"],
                body: .init(byteBuffer: ByteBuffer(string: "upstream overloaded"))
            )
        }
        if model == "slow-headers" { try await Task.sleep(for: settings.headerDelay) }
        let streaming = body["stream"] as? Bool ?? false
        guard streaming else { return completion(model: model) }
        let includeUsage = (body["stream_options"] as? [String: Any])?["include_usage"] as? Bool ?? false
        return stream(model: model, includeUsage: includeUsage, settings: settings, streams: streams, gate: gate)
    }

    static let rateLimitHeaders: HTTPFields = [
        HTTPField.Name("x-ratelimit-remaining-requests")!: "99",
        HTTPField.Name("x-ratelimit-remaining-tokens")!: "99000",
        HTTPField.Name("x-ms-region")!: "Fake Region",
    ]

    private static func completion(model: String) -> Response {
        let body = """
            {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1764412245, "model": "\(model)", \
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from fake Circuit"}, \
            "finish_reason": "stop"}], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
            """
        var headers = rateLimitHeaders
        headers[.contentType] = "application/json"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: body)))
    }

    private static func stream(
        model: String,
        includeUsage: Bool,
        settings: Settings,
        streams: Journal<StreamOutcome>,
        gate: Gate
    ) -> Response {
        let crlf = model == "crlf-stream"
        @Sendable func event(_ json: String) -> ByteBuffer {
            ByteBuffer(string: crlf ? "data:\(json)\r\n\r\n" : "data: \(json)\n\n")
        }
        @Sendable func chunk(_ delta: String, finish: String = "null") -> ByteBuffer {
            event(
                #"{"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1764412245, "model": "\#(model)", "choices": [{"index": 0, "delta": \#(delta), "finish_reason": \#(finish)}]}"#
            )
        }
        let words: [String] = {
            switch model {
            case "slow-stream": (0..<settings.chunkCount).map { " w\($0)" }
            case "endless-stream", "slow-headers", "flood-stream": (0..<10_000).map { " w\($0)" }
            default: ["Hello", " from", " fake", " Circuit"]
            }
        }()
        let padding = model == "flood-stream" ? String(repeating: "x", count: 4_096) : ""
        var headers = rateLimitHeaders
        headers[.contentType] = "text/event-stream; charset=utf-8"
        headers[.cacheControl] = "no-cache"
        return Response(
            status: .ok,
            headers: headers,
            body: ResponseBody { writer in
                do {
                    if model == "late-stream" { await gate.wait() }
                    try await writer.write(
                        event(
                            #"{"id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}"#
                        )
                    )
                    for (index, word) in words.enumerated() {
                        if index > 0 {
                            switch model {
                            case "slow-stream", "endless-stream", "slow-headers": try await Task.sleep(for: settings.chunkGap)
                            case "gated-stream" where index == 1: await gate.wait()
                            case "stall-stream" where index == 1: try await Task.sleep(for: settings.headerDelay)
                            case "broken-stream" where index == 1:
                                try await writer.write(ByteBuffer(string: #"data: {"id": "chatcmpl-fake", "choi"#))
                                try await Task.sleep(for: settings.headerDelay)
                            default: break
                            }
                        }
                        try await writer.write(chunk(#"{"content": "\#(word)\#(padding)"}"#))
                    }
                    try await writer.write(chunk("{}", finish: #""stop""#))
                    if includeUsage {
                        try await writer.write(
                            event(
                                #"{"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1764412245, "model": "\#(model)", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": \#(words.count), "total_tokens": \#(11 + words.count)}}"#
                            )
                        )
                    }
                    try await writer.write(ByteBuffer(string: crlf ? "data:[DONE]\r\n\r\n" : "data: [DONE]\n\n"))
                    try await writer.finish(nil)
                    await streams.append(StreamOutcome(model: model, completed: true))
                } catch {
                    await streams.append(StreamOutcome(model: model, completed: false))
                    throw error
                }
            }
        )
    }

    private static func error(_ status: Int, code: String, _ message: String) -> Response {
        let body = #"{"error": {"code": "\#(code)", "message": "\#(message)"}}"#
        return Response(
            status: .init(code: status),
            headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(string: body))
        )
    }
}

/// A one-way latch.
actor Gate {
    private var isOpen = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func open() {
        isOpen = true
        for waiter in waiters { waiter.resume() }
        waiters = []
    }

    func wait() async {
        if isOpen { return }
        await withCheckedContinuation { waiters.append($0) }
    }
}
