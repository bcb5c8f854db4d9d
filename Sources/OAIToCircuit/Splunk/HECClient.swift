import AsyncHTTPClient
import CompressNIO
import NIOCore
import NIOPosix
import NIOSSL

/// Posts batches to Splunk's HTTP Event Collector over keep-alive connections of its own `HTTPClient` (Circuit's
/// client has Circuit's timeouts, and Splunk must never take a connection Circuit needs):
/// `Authorization: Splunk <token>`, gzip when `SPLUNK_HEC_GZIP` is on, `X-Splunk-Request-Channel` when
/// `SPLUNK_HEC_CHANNEL` is set, `SPLUNK_HEC_TIMEOUT_SECONDS` for the whole exchange, and no certificate check when
/// `SPLUNK_VERIFY_SSL` is off.
struct HECClient: Sendable {
    let httpClient: HTTPClient
    let url: String
    private let authorization: String
    private let token: String
    let channel: String?
    let gzip: Bool
    let timeout: Duration
    let tls: TLSConfiguration?
    /// zlib's fastest level: a batch of usage events shrinks about 11 times (14 at the default level) for a third of
    /// the CPU (1.5 MB of events: 5 ms against 14 ms), and the batches are made on the event loops.
    static let compression = ZlibConfiguration(compressionLevel: .fastestCompression)
    /// Splunk's answers are a line of JSON; a proxy's error page is read no further than this.
    static let maximumAnswer = 64 * 1024

    /// `nil` unless both `SPLUNK_HEC_URL` and `SPLUNK_HEC_TOKEN` are set. Call `shutdown()` when done.
    init?(_ settings: BridgeConfiguration.Splunk) {
        guard let url = settings.eventURL, let token = settings.token else { return nil }
        var configuration = HTTPClient.Configuration()
        let timeout = TimeAmount(settings.timeout)
        configuration.timeout = .init(connect: min(timeout, .seconds(10)), read: timeout)
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 8)
        // The shipper retries with backoff itself.
        configuration.connectionPool.retryConnectionEstablishment = false
        configuration.redirectConfiguration = .disallow
        configuration.decompression = .disabled
        self.httpClient = HTTPClient(eventLoopGroup: MultiThreadedEventLoopGroup.singleton, configuration: configuration)
        self.url = url
        self.authorization = "Splunk " + token
        self.token = token
        self.channel = settings.channel
        self.gzip = settings.gzip
        self.timeout = settings.timeout
        if settings.verifyTLS {
            self.tls = nil
        } else {
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.certificateVerification = .none
            self.tls = tls
        }
    }

    func shutdown() async {
        try? await httpClient.shutdown()
    }

    /// Splunk's status and answer to one batch (concatenated HEC events). Throws on transport errors and timeouts.
    func post(_ payload: [UInt8]) async throws -> (status: Int, answer: ByteBuffer) {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Authorization", value: authorization)
        request.headers.add(name: "Content-Type", value: "application/json")
        if let channel { request.headers.add(name: "X-Splunk-Request-Channel", value: channel) }
        var body = ByteBuffer(bytes: payload)
        if gzip {
            body = try body.compress(with: .gzip(configuration: Self.compression))
            request.headers.add(name: "Content-Encoding", value: "gzip")
        }
        request.body = .bytes(body)
        request.tlsConfiguration = tls
        let response = try await httpClient.execute(request, timeout: TimeAmount(timeout))
        var answer = ByteBuffer()
        for try await var chunk in response.body {
            let room = Self.maximumAnswer - answer.readableBytes
            guard room > 0 else { continue }
            if chunk.readableBytes > room { chunk = chunk.getSlice(at: chunk.readerIndex, length: room) ?? chunk }
            answer.writeBuffer(&chunk)
        }
        return (Int(response.status.code), redacted(answer))
    }

    /// The answer without the token, should something between echo the request's headers: it is logged, stored
    /// with events set aside, and printed by `hec test`.
    private func redacted(_ answer: ByteBuffer) -> ByteBuffer {
        let text = String(buffer: answer)
        guard text.contains(token) else { return answer }
        return ByteBuffer(string: text.replacingOccurrences(of: token, with: "[SPLUNK_HEC_TOKEN]"))
    }

    /// A transport error, described for the log, `/health` and `hec test` (never with a header or the token).
    static func describe(_ error: any Error) -> String {
        if let error = error as? HTTPClientError {
            switch error {
            case .connectTimeout: return "could not connect to Splunk in time"
            case .deadlineExceeded, .readTimeout: return "Splunk did not answer within SPLUNK_HEC_TIMEOUT_SECONDS"
            case .remoteConnectionClosed:
                return "Splunk closed the connection without answering"
            case .cancelled: return "cancelled"
            default:
                // Some of these carry header values (the token among them); only the kind is safe to show.
                return "HTTP client error (\(error.shortDescription))"
            }
        }
        if let error = error as? IOError {
            return error.errnoCode == ECONNREFUSED ? "connection refused" : "network error: \(error.description)"
        }
        if error is NIOConnectionError {
            return "could not connect (connection refused or host unreachable)"
        }
        if let error = error as? NIOSSLError {
            return "TLS failed: \(error)"
        }
        if let error = error as? BoringSSLError {
            return "TLS failed: \(error)"
        }
        if error is CancellationError { return "cancelled" }
        return "\(type(of: error)): \(error)"
    }
}
