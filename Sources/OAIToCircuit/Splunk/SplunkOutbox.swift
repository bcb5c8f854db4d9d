/// A Splunk event as the ledger keeps it until Splunk has it: the event object's JSON and its time. The envelope
/// (`host`, `source`, `sourcetype`, `index`) is added when it is sent, so that pending events go where the
/// configuration says at that moment (an operator who fixes `SPLUNK_INDEX` and restarts gets them all there).
public struct OutboxEvent: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable {
        /// A request Circuit answered (sourcetype `SPLUNK_SOURCETYPE`).
        case usage
        /// An answer the bridge gave itself (sourcetype `SPLUNK_SOURCETYPE:error`).
        case error
    }

    public var kind: Kind
    /// When the request finished, seconds since 1970: the envelope's `time`.
    public var time: Double
    /// The `event` member's JSON object.
    public var body: [UInt8]

    public init(kind: Kind, time: Double, body: [UInt8]) {
        self.kind = kind
        self.time = time
        self.body = body
    }
}

/// An event read from an outbox, with the id that acknowledges it. Ids grow in the order events were committed.
public struct PendingEvent: Sendable, Equatable {
    public var id: Int64
    public var event: OutboxEvent

    public init(id: Int64, event: OutboxEvent) {
        self.id = id
        self.event = event
    }
}

/// What waits in an outbox.
public struct OutboxCounts: Sendable, Equatable {
    public var usage = 0
    public var error = 0
    public var deadLettered = 0
    /// The time of the oldest pending event.
    public var oldest: Double?

    public init(usage: Int = 0, error: Int = 0, deadLettered: Int = 0, oldest: Double? = nil) {
        self.usage = usage
        self.error = error
        self.deadLettered = deadLettered
        self.oldest = oldest
    }

    public var pending: Int { usage + error }
}

/// Where the shipper takes events from and reports what became of them: the ledger (its outbox of error events and
/// the usage events of its request log, committed with the usage they describe), or the request log for
/// `hec replay`.
public protocol SplunkOutbox: Sendable {
    /// Up to `limit` events with ids above `id`, oldest first.
    func pendingEvents(after id: Int64, limit: Int) async throws -> [PendingEvent]
    /// Splunk indexed the events with ids in `ids` (a run of events read together; Splunk's answers may come out of
    /// order, so runs above one still being retried may be delivered first).
    func delivered(_ ids: ClosedRange<Int64>) async throws
    /// Every event with an id up to `id` is delivered or set aside (the shipper holds none of them any more).
    func settled(through id: Int64) async throws
    /// Splunk refused `event` as malformed: it is kept aside with Splunk's answer, and never sent again.
    func deadLetter(_ event: PendingEvent, answer: String, at time: Double) async throws
    func outboxCounts() async throws -> OutboxCounts
}
