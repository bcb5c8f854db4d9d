import NIOCore

/// Reads Circuit's Server-Sent Events as they pass: finds the usage chunk, hides it when the client did not
/// ask for usage, and holds back the closing `data: [DONE]` event so the bridge can commit the request's usage
/// before the client receives its last byte.
///
/// Tolerates `data:` without a space and CRLF line ends. Emits whole lines (whole events while hiding), so a
/// client sees each chunk as soon as its line is complete; only a partial line is ever waited for.
struct ServerSentEventFilter {
    /// The latest usage Circuit reported in the stream so far.
    private(set) var usage: Usage?
    /// Whether `data: [DONE]` has been seen.
    private(set) var sawDone = false

    private let hidesUsageChunk: Bool
    /// Bytes received and not yet sent or dropped.
    private var pending: [UInt8] = []
    /// `pending[..<scanned]` is made of complete lines already read.
    private var scanned = 0
    /// Where the event being read began in `pending`.
    private var eventStart = 0
    private var eventData: [UInt8] = []
    private var eventHasData = false
    /// While hiding, an upstream that never ends its events must not make the bridge buffer without bound.
    private static let maximumHeldEvent = 1 << 20

    init(hidesUsageChunk: Bool) {
        self.hidesUsageChunk = hidesUsageChunk
    }

    /// Takes the next bytes from Circuit; returns what the client should get now.
    mutating func consume(_ buffer: ByteBuffer) -> ByteBuffer? {
        pending.append(contentsOf: buffer.readableBytesView)
        guard !sawDone else { return nil }
        var sendUpTo = 0
        var drops: [Range<Int>] = []
        while !sawDone, let newline = pending[scanned...].firstIndex(of: UInt8(ascii: "\n")) {
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
        }
        if !sawDone, hidesUsageChunk, pending.count - eventStart > Self.maximumHeldEvent {
            sendUpTo = pending.count
            eventStart = pending.count
            scanned = pending.count
        }
        return take(upTo: sendUpTo, dropping: drops)
    }

    /// At the end of Circuit's stream: reads an unterminated last event and returns everything still held.
    mutating func finish() -> ByteBuffer? {
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

    private mutating func readLine(_ range: Range<Int>) {
        let line = pending[range]
        guard line.starts(with: "data:".utf8) else { return }
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
            eventData.removeAll(keepingCapacity: true)
            eventHasData = false
        }
        guard eventHasData, Self.mentionsUsage(eventData),
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
        pending.removeFirst(end)
        scanned = max(0, scanned - end)
        eventStart = max(0, eventStart - end)
        return output.readableBytes > 0 ? output : nil
    }

    private static func mentionsUsage(_ bytes: [UInt8]) -> Bool {
        let needle = Array(#""usage""#.utf8)
        guard bytes.count >= needle.count else { return false }
        var index = 0
        while index <= bytes.count - needle.count {
            if bytes[index] == needle[0], bytes[index..<(index + needle.count)].elementsEqual(needle) { return true }
            index += 1
        }
        return false
    }
}
