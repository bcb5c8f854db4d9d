import Foundation
import HTTPTypes
import Hummingbird
import NIOConcurrencyHelpers
import NIOCore

/// An OAuth2 token endpoint that checks the client-credentials grant the way Cisco's identity service does:
/// `POST`, `Authorization: Basic base64(id:secret)`, a form body with `grant_type=client_credentials`.
public final class FakeTokenEndpoint: Sendable {
    public struct Settings: Sendable {
        public var clientID = "client-id"
        public var clientSecret = "client-secret"
        public var expiresIn = 3600
        /// When set, every request gets this status and an OAuth error body.
        public var failWithStatus: Int?
        /// Held before answering, so concurrent first requests overlap.
        public var delay: Duration = .zero
        public init() {}
    }

    public let settings: NIOLockedValueBox<Settings>
    /// Every token request the endpoint accepted or refused.
    public let requests: Journal<Int>
    private let issued: NIOLockedValueBox<[String]>
    private let revoked = NIOLockedValueBox<Set<String>>([])
    private let server: FakeServer

    public static func start(_ settings: Settings = Settings()) async throws -> FakeTokenEndpoint {
        let box = NIOLockedValueBox(settings)
        let issued = NIOLockedValueBox<[String]>([])
        let journal = Journal<Int>()
        let responder = CallbackResponder<BasicRequestContext> { request, _ in
            let body = try await request.body.collect(upTo: 1 << 20)
            let current = box.withLockedValue { $0 }
            await journal.append(await journal.count + 1)
            if current.delay > .zero { try await Task.sleep(for: current.delay) }
            if let status = current.failWithStatus {
                return Self.json(#"{"error": "server_error"}"#, status: .init(code: status))
            }
            guard request.method == .post, request.uri.path == "/oauth2/default/v1/token" else {
                return Self.json(#"{"error": "not_found"}"#, status: .notFound)
            }
            let expected = "Basic " + Data("\(current.clientID):\(current.clientSecret)".utf8).base64EncodedString()
            guard request.headers[.authorization] == expected else {
                return Self.json(#"{"error": "invalid_client"}"#, status: .unauthorized)
            }
            guard request.headers[.contentType]?.hasPrefix("application/x-www-form-urlencoded") == true,
                String(buffer: body).split(separator: "&").contains("grant_type=client_credentials")
            else {
                return Self.json(#"{"error": "unsupported_grant_type"}"#, status: .badRequest)
            }
            let token = issued.withLockedValue { tokens in
                tokens.append("access-token-\(tokens.count + 1)")
                return tokens.last!
            }
            return Self.json(
                #"{"token_type": "Bearer", "expires_in": \#(current.expiresIn), "access_token": "\#(token)", "scope": "api"}"#,
                status: .ok
            )
        }
        let server = try await FakeServer.start(responder)
        return FakeTokenEndpoint(server: server, settings: box, issued: issued, journal: journal)
    }

    private init(
        server: FakeServer,
        settings: NIOLockedValueBox<Settings>,
        issued: NIOLockedValueBox<[String]>,
        journal: Journal<Int>
    ) {
        self.server = server
        self.settings = settings
        self.issued = issued
        self.requests = journal
    }

    public var url: String { server.baseURL + "/oauth2/default/v1/token" }
    public var port: Int { server.port }

    /// Tokens handed out so far, oldest first.
    public var issuedTokens: [String] { issued.withLockedValue { $0 } }

    /// Whether Circuit should accept `token`.
    public func isValid(_ token: String) -> Bool {
        issued.withLockedValue { $0.contains(token) } && !revoked.withLockedValue { $0.contains(token) }
    }

    /// Makes Circuit refuse a token it would otherwise accept, as when Circuit rotates its keys.
    public func revoke(_ token: String) { _ = revoked.withLockedValue { $0.insert(token) } }

    public func stop() async { await server.stop() }

    static func json(_ text: String, status: HTTPResponse.Status) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: text)))
    }
}
