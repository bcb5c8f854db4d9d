import Logging

/// Decides whether a subkey may use the bridge (section 4.2 step 1). `subkey` is `nil` for an anonymous request,
/// which only reaches here when `REQUIRE_SUBKEY=false`.
public protocol SubkeyAuthorizer: Sendable {
    func authorize(subkey: String?) async throws(BridgeError) -> Caller
}

/// A request's claim on its caller's allowance, made at admission.
public struct Admission: Sendable {
    public var caller: Caller
    public var model: String
    /// When the request was admitted, seconds since 1970: its periodic counts belong to that day and month.
    public var admittedAt: Double

    public init(caller: Caller, model: String, admittedAt: Double = 0) {
        self.caller = caller
        self.model = model
        self.admittedAt = admittedAt
    }
}

/// Per-caller, per-model limits (section 5.2).
public protocol AdmissionPolicy: Sendable {
    /// Reserves one request of `model` for `caller`, or throws `model_not_allowed` (403) or `quota_exceeded` (429).
    func admit(_ caller: Caller, model: String) async throws(BridgeError) -> Admission
    /// Gives back a reservation whose request never reached Circuit.
    func release(_ admission: Admission) async
    /// Whether `caller` may use `model` at all (`GET /v1/models` lists only those).
    func allows(_ caller: Caller, model: String) async -> Bool
}

/// One request Circuit answered, whatever its status.
public struct UsageRecord: Sendable {
    public var requestID: String
    /// When the request finished, seconds since 1970.
    public var finishedAt: Double
    public var admission: Admission
    public var statusCode: Int
    public var usage: Usage
    public var isStreaming: Bool
    public var latency: Duration
    public var clientDisconnected: Bool
    public var clientAddress: String
    /// The raw `X-Forwarded-For` header, `""` when absent.
    public var forwardedFor: String

    public var caller: Caller { admission.caller }
    public var model: String { admission.model }

    public init(
        requestID: String,
        finishedAt: Double,
        admission: Admission,
        statusCode: Int,
        usage: Usage,
        isStreaming: Bool,
        latency: Duration,
        clientDisconnected: Bool,
        clientAddress: String,
        forwardedFor: String
    ) {
        self.requestID = requestID
        self.finishedAt = finishedAt
        self.admission = admission
        self.statusCode = statusCode
        self.usage = usage
        self.isStreaming = isStreaming
        self.latency = latency
        self.clientDisconnected = clientDisconnected
        self.clientAddress = clientAddress
        self.forwardedFor = forwardedFor
    }
}

/// An answer the bridge gave itself instead of Circuit's (401, 403, 429, 502, 504).
public struct RefusalRecord: Sendable {
    public var requestID: String
    public var finishedAt: Double
    public var error: BridgeError
    public var caller: Caller?
    public var model: String?
    public var clientAddress: String
    public var forwardedFor: String
}

/// Where accounting goes: the ledger and Splunk. The bridge awaits `record(_:)` before the last byte of a
/// response, so a recorder that commits durably makes every answer a client fully received accounted for.
/// Failures stay inside the recorder: bookkeeping never changes an answer Circuit already gave.
public protocol UsageRecorder: Sendable {
    func record(_ usage: UsageRecord) async
    func record(_ refusal: RefusalRecord) async
}

/// Every subkey passes (until the policy and key registry land).
public struct AcceptingAuthorizer: SubkeyAuthorizer {
    public init() {}
    public func authorize(subkey: String?) async throws(BridgeError) -> Caller { Caller(subkey: subkey) }
}

/// No limits.
public struct UnlimitedPolicy: AdmissionPolicy {
    public init() {}
    public func admit(_ caller: Caller, model: String) async throws(BridgeError) -> Admission {
        Admission(caller: caller, model: model)
    }
    public func release(_ admission: Admission) async {}
    public func allows(_ caller: Caller, model: String) async -> Bool { true }
}

/// Writes each record as a debug log line.
public struct LoggingUsageRecorder: UsageRecorder {
    let logger: Logger
    public init(logger: Logger) { self.logger = logger }

    public func record(_ usage: UsageRecord) async {
        logger.debug(
            "usage",
            metadata: [
                "request_id": "\(usage.requestID)", "key_id": "\(usage.caller.keyID)", "model": "\(usage.model)",
                "status": "\(usage.statusCode)", "prompt_tokens": "\(usage.usage.promptTokens)",
                "completion_tokens": "\(usage.usage.completionTokens)", "total_tokens": "\(usage.usage.totalTokens)",
                "streaming": "\(usage.isStreaming)", "client_disconnected": "\(usage.clientDisconnected)",
            ]
        )
    }

    public func record(_ refusal: RefusalRecord) async {
        logger.debug(
            "refused",
            metadata: [
                "request_id": "\(refusal.requestID)", "key_id": "\(refusal.caller?.keyID ?? "-")",
                "model": "\(refusal.model ?? "-")", "error": "\(refusal.error.code)",
            ]
        )
    }
}
