import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

/// Circuit's OAuth2 client-credentials access token: fetched on first use, cached, refreshed 60 s before it
/// expires, with one shared refresh for all requests that need it at the same moment.
public actor TokenProvider {
    private struct Token {
        var value: String
        var fetchedAt: Double
        var refreshAfter: Double
        var expiresAt: Double
    }

    private enum State {
        case empty
        case valid(Token)
        /// `previous` still serves if the refresh fails before it expires.
        case refreshing(Task<Token, any Error>, previous: Token?)
        /// The last fetch failed: requests fail at once until `until`, so an identity-service outage is not hammered.
        case failed(until: Double)
    }

    private enum FetchError: Error {
        case notConfigured
        case rejected(status: UInt, reason: String?)
        case malformedAnswer
    }

    /// How long before expiry a token is replaced.
    static let refreshMargin: Double = 60
    /// A token younger than this is not dropped when Circuit answers 401: the refusal is about something else
    /// (a bad appkey, say), and dropping it would let any client make the bridge hammer the identity service.
    static let minimumAgeForForcedRefresh: Double = 30
    /// After a failed fetch, how long requests fail without asking again.
    static let failureBackoff: Double = 1
    /// Longest lifetime believed, whatever `expires_in` says.
    static let maximumLifetime: Double = 86_400
    /// A hung identity service must not hold every chat for the whole upstream timeout.
    static let fetchTimeout: Duration = .seconds(30)

    private let credentials: ClientCredentials?
    private let tokenURL: UpstreamURL
    private let httpClient: HTTPClient
    private let clock: BridgeClock
    private let timeout: Duration
    private let metrics: BridgeMetrics
    private let logger: Logger
    private var state = State.empty {
        didSet {
            let usable: (value: String, refreshAfter: Double)? =
                if case .valid(let token) = state { (token.value, token.refreshAfter) } else { nil }
            current.withLock { $0 = usable }
        }
    }
    /// The cached token while it needs no refresh, readable without a hop to the actor: nearly every request
    /// finds it there (`validToken()`).
    private nonisolated let current = Mutex<(value: String, refreshAfter: Double)?>(nil)

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

    /// A valid access token, or `upstream_auth_failed`: the cached one at once, else through the actor.
    nonisolated func validToken() async throws(BridgeError) -> String {
        let now = clock.now()
        if let token = current.withLock({ $0 }), now < token.refreshAfter { return token.value }
        return try await token()
    }

    /// A valid access token, or `upstream_auth_failed`.
    func token() async throws(BridgeError) -> String {
        let now = clock.now()
        switch state {
        case .valid(let token) where now < token.refreshAfter:
            return token.value
        case .refreshing(let task, let previous):
            return try await Self.value(of: task, orStill: previous, now: now)
        case .failed(let until) where now < until:
            throw .upstreamAuthFailed
        case .valid(let token):
            return try await refresh(replacing: token)
        case .empty, .failed:
            return try await refresh(replacing: nil)
        }
    }

    private func refresh(replacing previous: Token?) async throws(BridgeError) -> String {
        // An unstructured task so that one caller going away does not fail the others sharing the refresh.
        let task = Task { try await self.fetch() }
        state = .refreshing(task, previous: previous)
        let result = await task.result
        let now = clock.now()
        switch result {
        case .success(let token):
            state = .valid(token)
        case .failure:
            if var previous, now < previous.expiresAt {
                // Keep serving the old token until it expires, trying again after the back-off.
                previous.refreshAfter = now + Self.failureBackoff
                state = .valid(previous)
            } else {
                state = .failed(until: now + Self.failureBackoff)
            }
        }
        return try await Self.value(of: task, orStill: previous, now: now)
    }

    /// Called when Circuit answered 401 to `value`. Returns whether a retry can use another token: a newer one is
    /// already cached or being fetched, or `value` was old enough to be dropped. While the identity service is
    /// failing there is none to be had, and Circuit's 401 is the better answer for the client.
    func refused(_ value: String) -> Bool {
        switch state {
        case .valid(let token) where token.value == value:
            guard clock.now() - token.fetchedAt >= Self.minimumAgeForForcedRefresh else { return false }
            state = .empty
            return true
        case .valid, .refreshing, .empty:
            return true
        case .failed:
            return false
        }
    }

    private static func value(
        of task: Task<Token, any Error>,
        orStill previous: Token?,
        now: Double
    ) async throws(BridgeError)
        -> String
    {
        do {
            return try await task.value.value
        } catch {
            if let previous, now < previous.expiresAt { return previous.value }
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
        let response = try await httpClient.execute(
            request,
            deadline: .now() + TimeAmount(min(timeout, Self.fetchTimeout)),
            logger: logger.forHTTPClient
        )
        let body = try await response.body.collect(upTo: 1 << 20)
        let answer = try? JSONDecoder().decode(TokenAnswer.self, from: Data(buffer: body))
        guard (200..<300).contains(response.status.code) else {
            throw FetchError.rejected(status: response.status.code, reason: answer?.error)
        }
        guard let answer, let value = answer.accessToken, !value.isEmpty else { throw FetchError.malformedAnswer }
        let claimed = answer.expiresIn ?? 3600
        let lifetime = claimed.isFinite ? min(max(0, claimed), Self.maximumLifetime) : 3600
        let margin = lifetime > 2 * Self.refreshMargin ? Self.refreshMargin : lifetime / 2
        logger.debug("fetched a Circuit access token", metadata: ["expires_in": "\(Int(lifetime))"])
        return Token(value: value, fetchedAt: started, refreshAfter: started + lifetime - margin, expiresAt: started + lifetime)
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

extension Logger {
    /// This logger for AsyncHTTPClient, never below `info`: at `trace` it dumps response bytes, which would put
    /// access tokens and chat content in the log.
    var forHTTPClient: Logger {
        var logger = self
        logger.logLevel = max(logger.logLevel, .info)
        return logger
    }
}

extension TimeAmount {
    init(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        self = .nanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }
}
