import AsyncHTTPClient
import Logging
import NIOCore
import NIOHTTP1

/// Sends chat requests to Circuit's deployment URL with a current access token, retrying once with a fresh
/// token when Circuit answers 401.
public struct CircuitClient: Sendable {
    private let httpClient: HTTPClient
    private let tokens: TokenProvider
    private let deploymentsURL: String
    private let apiVersion: String
    private let timeout: Duration

    public init(httpClient: HTTPClient, tokens: TokenProvider, base: UpstreamURL, apiVersion: String, timeout: Duration) {
        self.httpClient = httpClient
        self.tokens = tokens
        self.deploymentsURL = base.appending(path: "/openai/deployments/")
        self.apiVersion = apiVersion
        self.timeout = timeout
    }

    /// The chat URL for a validated model name.
    func chatURL(model: String) -> String {
        "\(deploymentsURL)\(model)/chat/completions?api-version=\(apiVersion)"
    }

    /// Circuit's response head; its body is read by the caller. `timeout` bounds the wait for the head.
    func send(model: String, body: ByteBuffer, logger: Logger) async throws(BridgeError) -> HTTPClientResponse {
        var request = HTTPClientRequest(url: chatURL(model: model))
        request.method = .POST
        request.headers.reserveCapacity(4)
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "Accept", value: "application/json")
        request.body = .bytes(body)
        var retried = false
        while true {
            let token = try await tokens.token()
            request.headers.replaceOrAdd(name: "api-key", value: token)
            let response: HTTPClientResponse
            do {
                response = try await httpClient.execute(
                    request,
                    deadline: .now() + TimeAmount(timeout),
                    logger: logger.forHTTPClient
                )
            } catch {
                throw Self.classify(error, logger: logger)
            }
            guard response.status == .unauthorized, !retried, await tokens.refused(token) else { return response }
            // Read the refusal so the connection can be reused, then try once more with a new token.
            _ = try? await response.body.collect(upTo: 1 << 20)
            retried = true
            logger.notice("Circuit refused the access token; retrying once with a new one")
        }
    }

    /// Maps a transport failure to the bridge's answer: timeouts are 504, everything else 502.
    static func classify(_ error: any Error, logger: Logger) -> BridgeError {
        let bridgeError: BridgeError
        if let error = error as? HTTPClientError,
            [.deadlineExceeded, .readTimeout, .connectTimeout, .writeTimeout].contains(error)
        {
            bridgeError = .upstreamTimeout
        } else {
            bridgeError = .upstreamUnreachable
        }
        logger.warning(
            "Circuit request failed",
            metadata: ["error": "\(TokenProvider.describe(error))", "answer": "\(bridgeError.code)"]
        )
        return bridgeError
    }
}
