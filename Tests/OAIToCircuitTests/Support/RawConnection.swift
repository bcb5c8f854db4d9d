import Foundation
import NIOCore
import NIOPosix

/// A bare TCP connection to the bridge: it sends exactly the bytes it is given and reads what comes back, so a test
/// can do what HTTP clients never do (pipelined requests, HTTP/1.0, `Expect: 100-continue`, a body sent after the
/// answer) and see when the server closes the connection.
final class RawConnection {
    /// One HTTP/1.1 response as read off the wire (a chunked body de-chunked).
    struct Response {
        var status: Int
        var headers: [(name: String, value: String)]
        var body: String

        func header(_ name: String) -> String? {
            headers.first { $0.name.lowercased() == name.lowercased() }?.value
        }
    }

    private let channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>
    private var inbound: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator
    private var received: [UInt8] = []
    private var ended = false

    init(port: Int) async throws {
        channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(
                        wrappingChannelSynchronously: channel,
                        configuration: .init(isOutboundHalfClosureEnabled: true)
                    )
                }
            }
        inbound = channel.inbound.makeAsyncIterator()
    }

    /// NIO requires the writer to be finished before it goes (a debug build stops otherwise).
    deinit {
        channel.outbound.finish()
    }

    func send(_ text: String) async throws {
        try await channel.outbound.write(ByteBuffer(string: text))
    }

    /// Closes the sending side only (TCP FIN); the answer can still be read.
    func finishSending() {
        channel.outbound.finish()
    }

    func close() async {
        try? await channel.channel.close()
    }

    /// The next response (only its head with `headOnly`); `nil` when the server closed the connection before
    /// sending one.
    func response(headOnly: Bool = false) async throws -> Response? {
        guard let headEnd = try await bytes(until: { Self.find([13, 10, 13, 10], in: $0).map { $0 + 4 } }) else {
            return nil
        }
        let head = String(decoding: received[..<headEnd], as: UTF8.self)
        received.removeFirst(headEnd)
        var lines = head.components(separatedBy: "\r\n").filter { !$0.isEmpty }
        let statusLine = lines.removeFirst().split(separator: " ")
        guard statusLine.count >= 2, let status = Int(statusLine[1]) else { throw RawConnectionError.malformed(head) }
        let headers = lines.map { line -> (name: String, value: String) in
            let colon = line.firstIndex(of: ":") ?? line.endIndex
            return (String(line[..<colon]), line[colon...].dropFirst().trimmingCharacters(in: .whitespaces))
        }
        var response = Response(status: status, headers: headers, body: "")
        if (100..<200).contains(status) || headOnly { return response }
        if let length = response.header("content-length").flatMap({ Int($0) }) {
            guard try await bytes(until: { $0.count >= length ? length : nil }) != nil else {
                throw RawConnectionError.closedMidBody
            }
            response.body = String(decoding: received[..<length], as: UTF8.self)
            received.removeFirst(length)
        } else if response.header("transfer-encoding")?.lowercased() == "chunked" {
            while true {
                guard let sizeEnd = try await bytes(until: { Self.find([13, 10], in: $0).map { $0 + 2 } }),
                    let size = Int(String(decoding: received[..<(sizeEnd - 2)], as: UTF8.self), radix: 16)
                else { throw RawConnectionError.closedMidBody }
                guard try await bytes(until: { $0.count >= sizeEnd + size + 2 ? 0 : nil }) != nil else {
                    throw RawConnectionError.closedMidBody
                }
                response.body += String(decoding: received[sizeEnd..<(sizeEnd + size)], as: UTF8.self)
                received.removeFirst(sizeEnd + size + 2)
                if size == 0 { break }
            }
        } else {
            // Delimited by the connection's end.
            while !ended { try await readMore() }
            response.body = String(decoding: received, as: UTF8.self)
            received.removeAll()
        }
        return response
    }

    /// Reads to the connection's end: whether the server closed it with nothing more sent.
    func closesWithoutMore() async throws -> Bool {
        try await readsToEnd().isEmpty
    }

    /// Everything still unread when the server closes the connection.
    func readsToEnd() async throws -> String {
        while !ended { try await readMore() }
        defer { received.removeAll() }
        return String(decoding: received, as: UTF8.self)
    }

    /// The bytes received and not yet taken, once there are at least `count` of them (they stay unread).
    func unread(atLeast count: Int) async throws -> [UInt8] {
        guard try await bytes(until: { $0.count >= count ? 0 : nil }) != nil else { throw RawConnectionError.closedMidBody }
        return received
    }

    /// Reads until `complete` finds what it needs in the bytes received (returning its answer), or the connection
    /// ends first (`nil`).
    private func bytes(until complete: ([UInt8]) -> Int?) async throws -> Int? {
        while true {
            if let found = complete(received) { return found }
            if ended { return nil }
            try await readMore()
        }
    }

    private func readMore() async throws {
        if let buffer = try await inbound.next() {
            received += buffer.readableBytesView
        } else {
            ended = true
        }
    }

    private static func find(_ needle: [UInt8], in haystack: [UInt8]) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        for start in 0...(haystack.count - needle.count) where haystack[start..<(start + needle.count)].elementsEqual(needle) {
            return start
        }
        return nil
    }
}

enum RawConnectionError: Error {
    case malformed(String)
    case closedMidBody
}
