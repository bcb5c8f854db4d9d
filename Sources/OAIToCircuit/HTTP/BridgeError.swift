import HTTPTypes
import Hummingbird
import NIOCore

/// An answer the bridge itself gives instead of Circuit's: OpenAI's error shape plus a top-level `detail`
/// carrying the same message, as scripts written for the earlier bridge read it.
public struct BridgeError: Error, Sendable, Equatable, CustomStringConvertible {
    public var status: HTTPResponse.Status
    /// OpenAI's `error.code`, also the `error_type` of Splunk error events and a metric label.
    public var code: String
    public var message: String
    public var param: String?
    /// Seconds until a periodic limit starts again (`Retry-After`).
    public var retryAfter: Int?

    public init(status: HTTPResponse.Status, code: String, message: String, param: String? = nil, retryAfter: Int? = nil) {
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retryAfter = retryAfter
    }

    /// OpenAI's `error.type` for the status.
    public var type: String {
        switch status.code {
        case 401: "authentication_error"
        case 403: "permission_error"
        case 429: "insufficient_quota"
        case 500...: "api_error"
        default: "invalid_request_error"
        }
    }

    public var description: String { "\(status.code) \(code): \(message)" }

    // MARK: The contract's errors (section 4.1)

    public static let invalidJSON = BridgeError(
        status: .badRequest,
        code: "invalid_json",
        message: "Invalid JSON in request body"
    )
    public static let modelRequired = BridgeError(
        status: .badRequest,
        code: "model_required",
        message: "Model parameter required",
        param: "model"
    )
    public static func invalidModel(_ rule: String) -> BridgeError {
        BridgeError(status: .badRequest, code: "invalid_model", message: rule, param: "model")
    }
    public static let subkeyRequired = BridgeError(
        status: .unauthorized,
        code: "subkey_required",
        message: "Subkey required. Provide 'Authorization: Bearer <subkey>' or 'X-Bridge-Subkey' header."
    )
    public static let unauthorizedSubkey = BridgeError(
        status: .forbidden,
        code: "unauthorized_subkey",
        message: "Unauthorized: Subkey not recognized. Please contact administrator."
    )
    public static func modelNotAllowed(_ model: String) -> BridgeError {
        BridgeError(
            status: .forbidden,
            code: "model_not_allowed",
            message: "Model '\(model)' is not allowed for this subkey",
            param: "model"
        )
    }
    public static func requestTooLarge(limit: Int) -> BridgeError {
        BridgeError(
            status: .contentTooLarge,
            code: "request_too_large",
            message: "Request body too large: the limit is \(limit) bytes"
        )
    }
    public static func quotaExceeded(_ limit: String, retryAfter: Int?) -> BridgeError {
        BridgeError(
            status: .tooManyRequests,
            code: "quota_exceeded",
            message: "Quota exceeded for this subkey and model (\(limit))",
            retryAfter: retryAfter
        )
    }
    public static let upstreamAuthFailed = BridgeError(
        status: .badGateway,
        code: "upstream_auth_failed",
        message: "Failed to authenticate with Circuit API"
    )
    public static let upstreamUnreachable = BridgeError(
        status: .badGateway,
        code: "upstream_unreachable",
        message: "Gateway error: could not reach Circuit API"
    )
    public static let upstreamTimeout = BridgeError(
        status: .gatewayTimeout,
        code: "upstream_timeout",
        message: "Gateway timeout - Circuit API took too long to respond"
    )
    /// A request line that HTTP/1.1's parser accepts but that names no resource (CONNECT's `host:port` form).
    public static let malformedRequest = BridgeError(
        status: .badRequest,
        code: "invalid_request",
        message: "Malformed request"
    )
    public static let notFound = BridgeError(status: .notFound, code: "not_found", message: "Not found")
    public static let methodNotAllowed = BridgeError(
        status: .methodNotAllowed,
        code: "method_not_allowed",
        message: "Method not allowed"
    )
    public static let internalError = BridgeError(
        status: .internalServerError,
        code: "internal_error",
        message: "Internal error in the bridge"
    )

    /// The JSON body: `{"error": {"message", "type", "param", "code"}, "detail"}`.
    public var body: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(160 + message.utf8.count * 2)
        out.append(contentsOf: #"{"error": {"message": "#.utf8)
        JSONString.encode(message, into: &out)
        out.append(contentsOf: #", "type": "#.utf8)
        JSONString.encode(type, into: &out)
        out.append(contentsOf: #", "param": "#.utf8)
        if let param { JSONString.encode(param, into: &out) } else { out.append(contentsOf: "null".utf8) }
        out.append(contentsOf: #", "code": "#.utf8)
        JSONString.encode(code, into: &out)
        out.append(contentsOf: #"}, "detail": "#.utf8)
        JSONString.encode(message, into: &out)
        out.append(UInt8(ascii: "}"))
        return out
    }

    func response(headers extra: HTTPFields = [:]) -> Response {
        var headers = extra
        headers[.contentType] = "application/json"
        if let retryAfter { headers[.retryAfter] = String(retryAfter) }
        let bytes = body
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }
}
