import HTTPTypes
import Hummingbird

/// `CORS_ALLOW_ORIGINS` for `/v1/*`: which browser origins may call the bridge. Empty sends no CORS headers.
struct CORSPolicy: Sendable {
    private let origins: Set<String>
    private let allowsAny: Bool

    init(allowedOrigins: [String]) {
        self.origins = Set(allowedOrigins)
        self.allowsAny = allowedOrigins.contains("*")
    }

    var isEnabled: Bool { allowsAny || !origins.isEmpty }

    private func allowedOrigin(for request: Request) -> String? {
        guard isEnabled, let origin = request.headers[.origin] else { return nil }
        if allowsAny { return "*" }
        return origins.contains(origin) ? origin : nil
    }

    func decorate(_ headers: inout HTTPFields, for request: Request) {
        guard isEnabled else { return }
        if !allowsAny { headers[.vary] = "Origin" }
        guard let origin = allowedOrigin(for: request) else { return }
        headers[.accessControlAllowOrigin] = origin
        headers[.accessControlExposeHeaders] = "X-Request-ID, Retry-After"
    }

    /// The answer to a browser's preflight `OPTIONS`.
    func preflight(for request: Request) -> Response {
        var headers: HTTPFields = [:]
        if let origin = allowedOrigin(for: request) {
            headers[.accessControlAllowOrigin] = origin
            headers[.accessControlAllowMethods] = "GET, POST, OPTIONS"
            headers[.accessControlAllowHeaders] =
                request.headers[.accessControlRequestHeaders]
                ?? "Authorization, Content-Type, X-Bridge-Subkey, X-Request-ID"
            headers[.accessControlMaxAge] = "600"
        }
        if !allowsAny { headers[.vary] = "Origin" }
        return Response(status: .noContent, headers: headers)
    }
}
