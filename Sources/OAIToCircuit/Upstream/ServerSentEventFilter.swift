import NIOCore

/// Reads Circuit's Server-Sent Events as they pass: finds the usage chunk, hides it when the client did not
/// ask for usage, and holds back the closing `data: [DONE]` event so the bridge can commit the request's usage
/// before the client receives its last byte.
///
/// Tolerates `data:` without a space and CRLF line ends. Emits whole lines (whole events while hiding), so a
/// client sees each chunk as soon as its line is complete; only a partial line is ever waited for. What it holds
/// is bounded: a line or event longer than `maximumHeld` is passed on as it is.
public struct ServerSentEventFilter {
    /// The latest usage Circuit reported in the stream so far.
    public private(set) var usage: Usage?
    /// Whether `data: [DONE]` has been seen.
    public private(set) var sawDone = false

    private let hidesUsageChunk: Bool
    /// Bytes received and not yet sent or dropped.
    private var pending: [UInt8] = []
    /// `pending[..<scanned]` is made of complete lines already read.
    private var scanned = 0
    /// Where the next search for a line end starts, so a long partial line is not searched again and again.
    private var searchFrom = 0
    /// Where the event being read began in `pending`.
    private var eventStart = 0
    private var eventData: [UInt8] = []
    private var eventHasData = false
    /// An event was lost from view (its start was sent as it grew too long); it is passed on, never read.
    private var eventIsOversized = false
    /// Whether what the client has received so far ends between events.
    private var sentEndsAnEvent = true
    static let maximumHeld = 1 << 20

    public init(hidesUsageChunk: Bool) {
        self.hidesUsageChunk = hidesUsageChunk
    }

    /// Takes the next bytes from Circuit; returns what the client should get now.
    public mutating func consume(_ buffer: ByteBuffer) -> ByteBuffer? {
        if sawDone {
            // Nothing should follow [DONE]; whatever does is held (up to the bound) and sent at the end.
            guard pending.count < Self.maximumHeld else { return nil }
        }
        pending.append(contentsOf: buffer.readableBytesView)
        guard !sawDone else { return nil }
        var sendUpTo = 0
        var drops: [Range<Int>] = []
        while !sawDone, let newline = pending[searchFrom...].firstIndex(of: UInt8(ascii: "\n")) {
            let contentEnd = newline > scanned && pending[newline - 1] == UInt8(ascii: "\r") ? newline - 1 : newline
            if contentEnd == scanned {
                if endEvent() { drops.append(eventStart..<(newline + 1)) }
                eventStart = newline + 1
                sendUpTo = newline + 1
            } else {
                readLine(scanned..<contentEnd)
                if sawDone {
                    sendUpTo = hidesUsageChunk ? eventStart : scanned
                    break
                }
                if !hidesUsageChunk { sendUpTo = newline + 1 }
            }
            scanned = newline + 1
            searchFrom = scanned
        }
        if !sawDone {
            searchFrom = pending.count
            if pending.count - (hidesUsageChunk ? eventStart : scanned) > Self.maximumHeld {
                // An upstream that never ends its line or event must not make the bridge buffer without bound.
                sendUpTo = pending.count
                scanned = pending.count
                searchFrom = pending.count
                eventStart = pending.count
                eventData.removeAll()
                eventHasData = false
                eventIsOversized = true
            }
        }
        return take(upTo: sendUpTo, dropping: drops)
    }

    /// At the end of Circuit's stream: reads an unterminated last event and returns everything still held.
    public mutating func finish() -> ByteBuffer? {
        var drops: [Range<Int>] = []
        if !sawDone {
            if scanned < pending.count {
                var contentEnd = pending.count
                if pending[contentEnd - 1] == UInt8(ascii: "\r") { contentEnd -= 1 }
                if contentEnd > scanned { readLine(scanned..<contentEnd) }
                scanned = pending.count
            }
            if !sawDone, endEvent() { drops.append(eventStart..<pending.count) }
        }
        return take(upTo: pending.count, dropping: drops)
    }

    /// When Circuit fails mid-stream: drops what is held (an unfinished line or event) and returns what ends the
    /// client's stream between events, so that an event the bridge adds next stands alone.
    mutating func abandon() -> ByteBuffer? {
        pending.removeAll()
        scanned = 0
        searchFrom = 0
        eventStart = 0
        return sentEndsAnEvent ? nil : ByteBuffer(string: "\n")
    }

    private mutating func readLine(_ range: Range<Int>) {
        let line = pending[range]
        guard !eventIsOversized, line.starts(with: "data:".utf8) else { return }
        var payload = line.dropFirst(5)
        if payload.first == UInt8(ascii: " ") { payload = payload.dropFirst() }
        if payload.elementsEqual("[DONE]".utf8) {
            sawDone = true
            return
        }
        if eventHasData { eventData.append(UInt8(ascii: "\n")) }
        eventData.append(contentsOf: payload)
        eventHasData = true
    }

    /// Ends the current event; returns whether the client must not see it.
    private mutating func endEvent() -> Bool {
        defer {
            eventData.removeAll(keepingCapacity: eventData.count <= 64 * 1024)
            eventHasData = false
            eventIsOversized = false
        }
        // `"usage": null` rides on every chunk once usage is asked for: only a usage object is worth parsing.
        guard eventHasData, !eventIsOversized, Self.containsUsageObject(eventData),
            let observation = eventData.withUnsafeBufferPointer({ Usage.observe($0) }),
            let usage = observation.usage
        else { return false }
        self.usage = usage
        return hidesUsageChunk && observation.hasEmptyChoices
    }

    private mutating func take(upTo end: Int, dropping drops: [Range<Int>]) -> ByteBuffer? {
        guard end > 0 else { return nil }
        var output = ByteBufferAllocator().buffer(capacity: end)
        var position = 0
        for drop in drops where drop.lowerBound < end {
            output.writeBytes(pending[position..<drop.lowerBound])
            position = min(drop.upperBound, end)
        }
        output.writeBytes(pending[position..<end])
        if output.readableBytes > 0 { sentEndsAnEvent = end == eventStart }
        pending.removeFirst(end)
        scanned = max(0, scanned - end)
        searchFrom = max(scanned, searchFrom - end)
        eventStart = max(0, eventStart - end)
        return output.readableBytes > 0 ? output : nil
    }

    /// Whether the bytes hold `"usage"` followed (after optional whitespace and a colon) by `{`.
    private static func containsUsageObject(_ bytes: [UInt8]) -> Bool {
        let needle = Array(#""usage""#.utf8)
        guard bytes.count > needle.count else { return false }
        var index = 0
        while index <= bytes.count - needle.count {
            defer { index += 1 }
            guard bytes[index] == needle[0], bytes[index..<(index + needle.count)].elementsEqual(needle) else { continue }
            var cursor = index + needle.count
            while cursor < bytes.count, [0x20, 0x09, 0x0A, 0x0D, UInt8(ascii: ":")].contains(bytes[cursor]) { cursor += 1 }
            if cursor < bytes.count, bytes[cursor] == UInt8(ascii: "{") { return true }
        }
        return false
    }
}
