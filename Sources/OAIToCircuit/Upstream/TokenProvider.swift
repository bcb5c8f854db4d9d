import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1

/// Circuit's OAuth2 client-credentials access token: fetched on first use, cached, refreshed 60 s before it
/// expires, with one shared refresh for all requests that need it at the same moment.
public actor TokenProvider {
    private struct Token {
        var value: String
        var refreshAfter: Double
    }

    private enum State {
        case empty
        case valid(Token)
        case refreshing(Task<Token, any Error>)
    }

    private enum FetchError: Error {
        case notConfigured
        case rejected(status: UInt, reason: String?)
        case malformedAnswer
    }

    /// How long before expiry a token is replaced.
    static let refreshMargin: Double = 60

    private let credentials: ClientCredentials?
    private let tokenURL: UpstreamURL
    private let httpClient: HTTPClient
    private let clock: BridgeClock
    private let timeout: Duration
    private let metrics: BridgeMetrics
    private let logger: Logger
    private var state = State.empty

    public init(
        credentials: ClientCredentials?,
        tokenURL: UpstreamURL,
        httpClient: HTTPClient,
        clock: BridgeClock,
        timeout: Duration,
        metrics: BridgeMetrics,
        logger: Logger
    ) {
        self.credentials = credentials
        self.tokenURL = tokenURL
        self.httpClient = httpClient
        self.clock = clock
        self.timeout = timeout
        self.metrics = metrics
        self.logger = logger
    }

    /// A valid access token, or `upstream_auth_failed`.
    func token() async throws(BridgeError) -> String {
        switch state {
        case .valid(let token) where clock.now() < token.refreshAfter:
            return token.value
        case .refreshing(let task):
            return try await Self.value(of: task)
        case .valid, .empty:
            // An unstructured task so that one caller going away does not fail the others sharing the refresh.
            let task = Task { try await self.fetch() }
            state = .refreshing(task)
            let result = await task.result
            switch result {
            case .success(let token): state = .valid(token)
            case .failure: state = .empty
            }
            return try await Self.value(of: task)
        }
    }

    /// Forgets `value` after Circuit refused it, so the next request fetches a new one.
    func invalidate(_ value: String) {
        if case .valid(let token) = state, token.value == value { state = .empty }
    }

    private static func value(of task: Task<Token, any Error>) async throws(BridgeError) -> String {
        do {
            return try await task.value.value
        } catch {
            throw .upstreamAuthFailed
        }
    }

    private func fetch() async throws -> Token {
        do {
            let token = try await requestToken()
            metrics.tokenRefreshes.increment()
            return token
        } catch {
            metrics.tokenRefreshFailures.increment()
            switch error {
            case FetchError.notConfigured:
                logger.error("Circuit credentials are not configured: set CIRCUIT_CLIENT_ID and CIRCUIT_CLIENT_SECRET")
            case FetchError.rejected(let status, let reason):
                logger.error(
                    "token endpoint refused the client credentials",
                    metadata: ["status": "\(status)", "oauth_error": "\(reason ?? "-")"]
                )
            case FetchError.malformedAnswer:
                logger.error("token endpoint answered without a usable access_token")
            default:
                logger.error("token endpoint unreachable", metadata: ["error": "\(Self.describe(error))"])
            }
            throw error
        }
    }

    private func requestToken() async throws -> Token {
        guard let credentials else { throw FetchError.notConfigured }
        var request = HTTPClientRequest(url: tokenURL.string)
        request.method = .POST
        let basic = Data("\(credentials.clientID):\(credentials.clientSecret)".utf8).base64EncodedString()
        request.headers.add(name: "Authorization", value: "Basic \(basic)")
        request.headers.add(name: "Content-Type", value: "application/x-www-form-urlencoded")
        request.headers.add(name: "Accept", value: "application/json")
        request.body = .bytes(ByteBuffer(string: "grant_type=client_credentials"))
        let started = clock.now()
        let response = try await httpClient.execute(request, deadline: .now() + TimeAmount(timeout), logger: logger)
        let body = try await response.body.collect(upTo: 1 << 20)
        let answer = try? JSONDecoder().decode(TokenAnswer.self, from: Data(buffer: body))
        guard (200..<300).contains(response.status.code) else {
            throw FetchError.rejected(status: response.status.code, reason: answer?.error)
        }
        guard let answer, let value = answer.accessToken, !value.isEmpty else { throw FetchError.malformedAnswer }
        let lifetime = max(0, answer.expiresIn ?? 3600)
        let margin = lifetime > 2 * Self.refreshMargin ? Self.refreshMargin : lifetime / 2
        logger.debug("fetched a Circuit access token", metadata: ["expires_in": "\(Int(lifetime))"])
        return Token(value: value, refreshAfter: started + lifetime - margin)
    }

    /// An error's type and kind, never its payload (which could carry a URL or header).
    static func describe(_ error: any Error) -> String {
        if let error = error as? HTTPClientError { return error.shortDescription }
        return String(describing: type(of: error))
    }

    private struct TokenAnswer: Decodable {
        var accessToken: String?
        var expiresIn: Double?
        var error: String?

        enum CodingKeys: String, CodingKey {
            case accessToken = "access_token"
            case expiresIn = "expires_in"
            case error
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            accessToken = try? container.decodeIfPresent(String.self, forKey: .accessToken)
            error = try? container.decodeIfPresent(String.self, forKey: .error)
            if let seconds = try? container.decodeIfPresent(Double.self, forKey: .expiresIn) {
                expiresIn = seconds
            } else if let text = try? container.decodeIfPresent(String.self, forKey: .expiresIn) {
                expiresIn = Double(text)
            }
        }
    }
}

extension TimeAmount {
    init(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        self = .nanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }
}
