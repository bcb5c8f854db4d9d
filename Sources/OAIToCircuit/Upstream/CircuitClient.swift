import Logging
import NIOCore
import NIOHTTP1
import NIOSSL

/// Sends chat requests to Circuit's deployment URL with a current access token, retrying once with a fresh
/// token when Circuit answers 401. Chat requests go over the bridge's own connection pool
/// (`UpstreamConnectionPool`); the token endpoint and Splunk use AsyncHTTPClient.
public struct CircuitClient: Sendable {
    private let pool: UpstreamConnectionPool
    private let tokens: TokenProvider
    private let endpoint: UpstreamEndpoint
    private let apiVersion: String

    /// `timeout`: the longest wait for Circuit's answer head, a wait for a connection included, and the longest
    /// silence between its chunks (`UPSTREAM_TIMEOUT_SECONDS`); `maximumConnections`:
    /// `UPSTREAM_MAX_CONNECTIONS`; `tls`: how Circuit's certificate is checked (by default, the system's roots).
    public init(
        tokens: TokenProvider,
        base: UpstreamURL,
        apiVersion: String,
        timeout: Duration,
        maximumConnections: Int,
        tls: TLSConfiguration? = nil
    ) throws {
        self.endpoint = UpstreamEndpoint(base)
        self.pool = try UpstreamConnectionPool(
            endpoint: endpoint,
            settings: .init(readTimeout: TimeAmount(timeout), maximumConnections: maximumConnections),
            tls: tls
        )
        self.tokens = tokens
        self.apiVersion = apiVersion
    }

    /// The request target for a validated model name.
    func target(model: String) -> String {
        "\(endpoint.path)/openai/deployments/\(model)/chat/completions?api-version=\(apiVersion)"
    }

    /// Circuit's answer: whole unless it is an event stream (then read by the caller as it arrives).
    func send(
        model: String,
        body: ByteBuffer,
        collectLimit: Int,
        logger: Logger
    ) async throws(BridgeError)
        -> UpstreamResponse
    {
        var headers = HTTPHeaders()
        headers.reserveCapacity(6)
        headers.add(name: "Host", value: endpoint.hostHeader)
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Accept", value: "application/json")
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        var request = UpstreamRequest(
            head: HTTPRequestHead(version: .http1_1, method: .POST, uri: target(model: model), headers: headers),
            body: body
        )
        var retried = false
        while true {
            let token = try await tokens.validToken()
            request.head.headers.replaceOrAdd(name: "api-key", value: token)
            let response: UpstreamResponse
            do {
                response = try await pool.execute(request, collectLimit: collectLimit)
            } catch {
                throw Self.classify(error, logger: logger)
            }
            guard response.status == .unauthorized, !retried, await tokens.refused(token) else { return response }
            // Then try once more with a new token.
            if case .stream(let body) = response.body { body.cancel() }
            retried = true
            logger.notice("Circuit refused the access token; retrying once with a new one")
        }
    }

    /// Closes idle connections to Circuit; answers under way finish.
    public func shutdown() async {
        await pool.shutdown()
    }

    /// Maps a transport failure to the bridge's answer: timeouts are 504, everything else 502.
    static func classify(_ error: any Error, logger: Logger) -> BridgeError {
        let bridgeError: BridgeError = error as? UpstreamError == .timedOut ? .upstreamTimeout : .upstreamUnreachable
        logger.warning(
            "Circuit request failed",
            metadata: ["error": "\(describe(error))", "answer": "\(bridgeError.code)"]
        )
        return bridgeError
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? UpstreamError { return error.description }
        return TokenProvider.describe(error)
    }
}
