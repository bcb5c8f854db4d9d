import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore

/// Routes every request of the bridge. A handful of exact paths, so a switch rather than a router: it also lets
/// the bridge tell 404 from 405 and answer both in OpenAI's error shape.
public struct BridgeResponder: Sendable {
    public typealias Context = BridgeRequestContext

    let bridge: Bridge
    let cors: CORSPolicy
    /// `created` of the listed models: when this bridge started.
    let createdAt: Int

    public init(bridge: Bridge) {
        self.bridge = bridge
        self.cors = CORSPolicy(allowedOrigins: bridge.configuration.corsAllowOrigins)
        self.createdAt = Int(bridge.clock.now())
    }

    /// A response, and what the server does once its last byte is written.
    public struct Answer: Sendable {
        public var response: Response
        /// The access log line, written after the response (a stream's own body writes it when it ends, so this is
        /// `nil` then).
        public var written: (@Sendable () -> Void)?
    }

    /// The answer to one request, whatever happens (a failure is an OpenAI-shaped error answer).
    public func respond(to request: Request, context: Context) async -> Answer {
        var exchange = Exchange(request: request, context: context)
        var response: Response
        do {
            response = try await route(request, context: context, exchange: &exchange)
        } catch let error as BridgeError {
            response = error.response()
            await recordRefusal(error, exchange: exchange)
        } catch {
            bridge.logger.error(
                "unexpected failure",
                metadata: ["request_id": "\(exchange.requestID)", "error": "\(type(of: error))"]
            )
            response = BridgeError.internalError.response()
        }
        if request.method == .head { response = response.createHeadResponse() }
        response.headers[.xRequestID] = exchange.requestID
        if exchange.route.hasPrefix("/v1/") { cors.decorate(&response.headers, for: request) }
        if exchange.logsWhenStreamEnds { return Answer(response: response) }
        return Answer(response: response, written: finish(exchange, status: Int(response.status.code)))
    }

    private func route(_ request: Request, context: Context, exchange: inout Exchange) async throws -> Response {
        let path = request.uri.path
        let method = request.method
        if method == .options, path.hasPrefix("/v1/"), cors.isEnabled {
            exchange.route = "/v1/*"
            return cors.preflight(for: request)
        }
        switch path {
        case "/v1/chat/completions":
            exchange.route = path
            guard method == .post else { throw BridgeError.methodNotAllowed }
            return try await chat(request, context: context, exchange: &exchange)
        case "/v1/models":
            exchange.route = path
            guard method == .get || method == .head else { throw BridgeError.methodNotAllowed }
            return try await models(request, exchange: &exchange)
        case _ where path.hasPrefix("/v1/models/"):
            exchange.route = "/v1/models/{model}"
            guard method == .get || method == .head else { throw BridgeError.methodNotAllowed }
            return try await model(String(path.dropFirst("/v1/models/".count)), request, exchange: &exchange)
        case "/health":
            exchange.route = path
            guard method == .get || method == .head else { throw BridgeError.methodNotAllowed }
            return await health()
        case "/metrics":
            exchange.route = path
            guard method == .get || method == .head else { throw BridgeError.methodNotAllowed }
            let text = bridge.metrics.registry.emitToBuffer()
            return Response(
                status: .ok,
                headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: ResponseBody(byteBuffer: ByteBuffer(bytes: text))
            )
        default:
            exchange.route = path.hasPrefix("/v1/") ? "/v1/*" : "other"
            throw BridgeError.notFound
        }
    }

    // MARK: Models and health

    private func models(_ request: Request, exchange: inout Exchange) async throws -> Response {
        let caller = try await authorize(request, exchange: &exchange)
        var out: [UInt8] = Array(#"{"object": "list", "data": ["#.utf8)
        var first = true
        for model in bridge.configuration.models where await bridge.policy.allows(caller, model: model) {
            if !first { out.append(contentsOf: ", ".utf8) }
            first = false
            appendModel(model, to: &out)
        }
        out.append(contentsOf: "]}".utf8)
        return Self.json(out)
    }

    private func model(_ name: String, _ request: Request, exchange: inout Exchange) async throws -> Response {
        let caller = try await authorize(request, exchange: &exchange)
        exchange.model = name
        guard bridge.configuration.models.contains(name), await bridge.policy.allows(caller, model: name) else {
            throw BridgeError(
                status: .notFound,
                code: "model_not_found",
                message: "The model '\(name)' does not exist",
                param: "model"
            )
        }
        var out: [UInt8] = []
        appendModel(name, to: &out)
        return Self.json(out)
    }

    private func appendModel(_ model: String, to out: inout [UInt8]) {
        out.append(contentsOf: #"{"id": "#.utf8)
        JSONString.encode(model, into: &out)
        out.append(contentsOf: #", "object": "model", "created": \#(createdAt), "owned_by": "circuit"}"#.utf8)
    }

    private func health() async -> Response {
        let report = await bridge.health()
        let configuration = bridge.configuration
        var out: [UInt8] = Array(#"{"status": "#.utf8)
        out.append(contentsOf: (report.isHealthy ? #""healthy""# : #""unhealthy""#).utf8)
        out.append(contentsOf: #", "service": "OpenAI to Circuit Bridge""#.utf8)
        out.append(contentsOf: #", "version": "#.utf8)
        JSONString.encode(BridgeVersion.current, into: &out)
        out.append(contentsOf: #", "credentials_configured": \#(configuration.credentials != nil)"#.utf8)
        out.append(contentsOf: #", "appkey_configured": \#(!configuration.appKey.isEmpty)"#.utf8)
        out.append(contentsOf: #", "require_subkey": \#(configuration.requireSubkey)"#.utf8)
        for (name, value) in report.fields {
            out.append(contentsOf: ", ".utf8)
            JSONString.encode(name, into: &out)
            out.append(contentsOf: ": ".utf8)
            out.append(contentsOf: value.utf8)
        }
        out.append(UInt8(ascii: "}"))
        return Self.json(out, status: report.isHealthy ? .ok : .serviceUnavailable)
    }

    static func json(_ bytes: [UInt8], status: HTTPResponse.Status = .ok) -> Response {
        Response(
            status: status,
            headers: [.contentType: "application/json"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes))
        )
    }

    // MARK: Shared steps

    /// Section 4.2 step 1: the subkey from `X-Bridge-Subkey` or `Authorization: Bearer`, then the authoriser.
    func authorize(_ request: Request, exchange: inout Exchange) async throws -> Caller {
        let subkey = Self.subkey(in: request.headers)
        if subkey == nil, bridge.configuration.requireSubkey { throw BridgeError.subkeyRequired }
        do {
            let caller = try await bridge.authorizer.authorize(subkey: subkey)
            exchange.caller = caller
            return caller
        } catch {
            // The refusal's record names the presented key (hashed), so misuse shows in the events.
            exchange.caller = Caller(subkey: subkey)
            throw error
        }
    }

    static func subkey(in headers: HTTPFields) -> String? {
        if let header = headers[.xBridgeSubkey], let subkey = trimmed(Substring(header)) { return String(subkey) }
        guard let authorization = headers[.authorization], let value = trimmed(Substring(authorization)),
            let space = value.utf8.firstIndex(where: isBlank),
            value.utf8[..<space].elementsEqual("bearer".utf8, by: { $0 | 0x20 == $1 }),
            let key = trimmed(value[space...])
        else { return nil }
        return String(key)
    }

    private static func isBlank(_ byte: UInt8) -> Bool { byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") }

    /// Without spaces and tabs at either end; `nil` when nothing is left. Byte by byte: Foundation's trimming, then
    /// `Character`s, showed in profiles.
    private static func trimmed(_ text: Substring) -> Substring? {
        let bytes = text.utf8
        guard let first = bytes.firstIndex(where: { !isBlank($0) }), let last = bytes.lastIndex(where: { !isBlank($0) })
        else { return nil }
        // Both ends are next to ASCII blanks (or the text's ends), so they fall between Unicode scalars.
        return text[first..<bytes.index(after: last)]
    }

    private func recordRefusal(_ error: BridgeError, exchange: Exchange) async {
        guard [401, 403, 429, 502, 504].contains(error.status.code) else { return }
        bridge.metrics.refused(code: error.code)
        await bridge.recorder.record(
            RefusalRecord(
                requestID: exchange.requestID,
                finishedAt: bridge.clock.now(),
                error: error,
                caller: exchange.caller,
                model: exchange.model,
                clientAddress: exchange.clientAddress,
                forwardedFor: exchange.forwardedFor
            )
        )
    }

    /// The request's metrics, at once, and its access log line, to write once the response is complete (the line's
    /// formatting and write are kept off the path to the client's last byte).
    func finish(_ exchange: Exchange, status: Int) -> @Sendable () -> Void {
        let duration = ContinuousClock.now - exchange.started
        bridge.metrics.requestFinished(route: exchange.route, status: status, model: exchange.model, duration: duration)
        return { [logger = bridge.logger] in Self.logLine(logger, exchange, status: status, duration: duration) }
    }

    private static func logLine(_ logger: Logger, _ exchange: Exchange, status: Int, duration: Duration) {
        logger.info(
            "request",
            metadata: [
                "method": "\(exchange.method)", "path": "\(exchange.path)", "status": "\(status)",
                "model": "\(exchange.model ?? "-")", "duration_ms": "\(duration.milliseconds)",
                "request_id": "\(exchange.requestID)", "client": "\(exchange.clientAddress)",
            ]
        )
    }
}

/// What the bridge has learnt about one request so far, for its log line, metrics and events.
struct Exchange: Sendable {
    let started = ContinuousClock.now
    let requestID: String
    let method: String
    let path: String
    let clientAddress: String
    let forwardedFor: String
    var route = "other"
    var caller: Caller?
    var model: String?
    /// A streamed answer logs itself when the stream ends.
    var logsWhenStreamEnds = false

    init(request: Request, context: BridgeRequestContext) {
        self.init(request: request, clientAddress: context.clientAddress)
    }

    init(request: Request, clientAddress: String) {
        self.requestID = Self.requestID(from: request.headers[.xRequestID])
        self.method = request.method.rawValue
        self.path = request.uri.path
        self.clientAddress = clientAddress
        self.forwardedFor = request.headers[.xForwardedFor] ?? ""
    }

    /// The client's `X-Request-ID` when it is short visible ASCII (safe to log and echo), else a new one.
    static func requestID(from header: String?) -> String {
        if let header, (1...200).contains(header.utf8.count), header.utf8.allSatisfy({ (0x21...0x7E).contains($0) }) {
            return header
        }
        return RequestID.next()
    }
}

extension HTTPField.Name {
    static let xRequestID = Self("X-Request-ID")!
    static let xBridgeSubkey = Self("X-Bridge-Subkey")!
    static let xForwardedFor = Self("X-Forwarded-For")!
}

extension Duration {
    var milliseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1000 + attoseconds / 1_000_000_000_000_000
    }
}

public enum BridgeVersion {
    public static let current = "2.0.0-dev"
}
