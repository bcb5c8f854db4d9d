import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Testing
import X509

@testable import OAIToCircuit

/// The bridge's own keep-alive connection pool to Circuit (`UpstreamConnectionPool`), against a scripted HTTP/1.1
/// server that records every connection and request. Tests wait for events the server reports, never for time,
/// except where the behaviour under test is a timeout.
@Suite(.serialized, .timeLimit(.minutes(1))) struct UpstreamPoolTests {
    // MARK: Keep-alive and the connection limit

    @Test func sequentialRequestsShareOneKeepAliveConnection() async throws {
        let server = try await ScriptedUpstream.start { request, reply in
            await reply.json(#"{"echo": \#(String(buffer: request.body))}"#)
        }
        try await withPool(server) { pool in
            for index in 0..<20 {
                let response = try await pool.execute(
                    upstreamRequest(body: #"{"n": \#(index)}"#, apiKey: "key-\(index)"),
                    collectLimit: 1 << 20
                )
                #expect(response.status == .ok)
                #expect(response.headers.first(name: "content-type") == "application/json")
                #expect(response.body.text == #"{"echo": {"n": \#(index)}}"#)
            }
        }
        let log = server.log
        #expect(log.accepted == 1)
        #expect(log.requests.count == 20)
        for (index, received) in log.requests.enumerated() {
            let body = #"{"n": \#(index)}"#
            #expect(received.connection == 1)
            #expect(received.method == .POST)
            #expect(received.uri == "/x")
            #expect(received.headers["Host"] == ["upstream.test"])
            #expect(received.headers["Content-Length"] == [String(body.utf8.count)])
            #expect(received.headers["Content-Type"] == ["application/json"])
            #expect(received.headers["api-key"] == ["key-\(index)"])
            #expect(received.headers["Transfer-Encoding"].isEmpty)
            #expect(String(buffer: received.body) == body)
        }
    }

    @Test func concurrentRequestsBeyondTheLimitWaitForAConnection() async throws {
        let gate = ScriptedGate()
        let server = try await ScriptedUpstream.start { request, reply in
            await gate.wait()
            await reply.json(String(buffer: request.body))
        }
        try await withPool(server, limit: 2) { pool in
            let (calls, calling) = AsyncStream<Int>.makeStream()
            let answers = try await withThrowingTaskGroup(of: String?.self) { group in
                for index in 0..<6 {
                    group.addTask {
                        calling.yield(index)
                        let response = try await pool.execute(upstreamRequest(body: "request \(index)"), collectLimit: 1024)
                        return response.body.text
                    }
                }
                // All six are under way and two have reached the server, which holds them.
                var started = 0
                for await _ in calls {
                    started += 1
                    if started == 6 { break }
                }
                await server.until { $0.requests.count >= 2 }
                #expect(server.log.accepted == 2)
                gate.open()
                var answers: [String?] = []
                for try await answer in group { answers.append(answer) }
                return answers
            }
            #expect(Set(answers) == Set((0..<6).map { "request \($0)" }))
        }
        let log = server.log
        #expect(log.maxOpen == 2)
        #expect(log.accepted == 2)
        #expect(log.requests.count == 6)
        #expect(Set(log.requests.map(\.connection)) == [1, 2])
    }

    /// The loops' shares add up to the limit, also when it does not divide evenly or is below the number of loops
    /// (then a loop without a share lends its requests to one with one), and every request is answered.
    @Test(arguments: [(limit: 2, shares: [0, 1, 1]), (limit: 4, shares: [1, 1, 2]), (limit: 1, shares: [0, 0, 1])])
    func theConnectionLimitHoldsAcrossEventLoops(limit: Int, shares: [Int]) async throws {
        let gate = ScriptedGate()
        let server = try await ScriptedUpstream.start { request, reply in
            await gate.wait()
            await reply.json(String(buffer: request.body))
        }
        try await withPool(server, limit: limit, loops: 3) { pool in
            #expect(pool.shares == shares)
            // Tasks outside the loops take them in turn, so each loop gets some of the nine.
            let answers = try await withThrowingTaskGroup(of: String?.self) { group in
                for index in 0..<9 {
                    group.addTask {
                        try await pool.execute(upstreamRequest(body: "request \(index)"), collectLimit: 1024).body.text
                    }
                }
                await server.until { $0.requests.count >= limit }
                gate.open()
                var answers: [String?] = []
                for try await answer in group { answers.append(answer) }
                return answers
            }
            #expect(Set(answers) == Set((0..<9).map { "request \($0)" }))
        }
        #expect(server.log.maxOpen <= limit)
        #expect(server.log.requests.count == 9)
    }

    @Test func requestWaitingForAConnectionTimesOut() async throws {
        let server = try await ScriptedUpstream.start { request, reply in
            if request.uri == "/busy" {
                // An answer the test does not read: the connection stays busy, and alive (a slow reader is not
                // Circuit's silence).
                await reply.head(.ok, ["Content-Type": "text/event-stream"])
                await reply.body(ByteBuffer(repeating: UInt8(ascii: "a"), count: 512 << 10))
            } else {
                await reply.json("fine")
            }
        }
        try await withPool(server, limit: 1, readTimeout: .seconds(1)) { pool in
            let busy = try await pool.execute(upstreamRequest("/busy"), collectLimit: 1024)
            let stream = try #require(busy.body.stream)
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest("/waits"), collectLimit: 1024)
            }
            #expect(error == .timedOut)
            // It never got a connection: nothing reached the server.
            #expect(server.log.requests.map(\.uri) == ["/busy"])
            #expect(server.log.accepted == 1)
            stream.cancel()
            await server.until { $0.closed.contains(1) }
            let after = try await pool.execute(upstreamRequest("/after"), collectLimit: 1024)
            #expect(after.body.text == "fine")
        }
        #expect(server.log.requests.last?.connection == 2)
    }

    /// Time in the queue counts against the wait for the head: `UPSTREAM_TIMEOUT_SECONDS` bounds how long a client
    /// waits for Circuit's answer to begin, not the queue and then the same again for Circuit.
    @Test func timeWaitingForAConnectionCountsAgainstTheHeadTimeout() async throws {
        let server = try await ScriptedUpstream.start { request, reply in
            // Each answer takes 1 s: well within the 1.5 s read timeout on its own.
            try? await Task.sleep(for: .seconds(1))
            await reply.json(request.uri)
        }
        try await withPool(server, limit: 1, readTimeout: .milliseconds(1_500)) { pool in
            async let first = pool.execute(upstreamRequest("/first"), collectLimit: 1024)
            await server.until { $0.requests.count >= 1 }
            // Queued behind the first for about 1 s, then 1 s more for its own answer: past 1.5 s in all.
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest("/second"), collectLimit: 1024)
            }
            #expect(error == .timedOut)
            let answer = try await first
            #expect(answer.body.text == "/first")
        }
        // It was sent (the connection came free in time) and then timed out waiting for the head.
        #expect(server.log.requests.map(\.uri) == ["/first", "/second"])
    }

    @Test func waitingRequestGetsANewConnectionWhenTheBusyOneCloses() async throws {
        let gate = ScriptedGate()
        let server = try await ScriptedUpstream.start { request, reply in
            if request.uri == "/first" {
                await gate.wait()
                await reply.json("first", headers: ["Connection": "close"])
            } else {
                await reply.json("second")
            }
        }
        try await withPool(server, limit: 1) { pool in
            let first = Task { try await pool.execute(upstreamRequest("/first"), collectLimit: 1024) }
            await server.until { $0.requests.count == 1 }
            let (started, starting) = AsyncStream<Never>.makeStream()
            let second = Task {
                starting.finish()
                return try await pool.execute(upstreamRequest("/second"), collectLimit: 1024)
            }
            // The second request waits (the pool's one connection is busy) when the first is answered.
            for await _ in started {}
            gate.open()
            let answers = (try await first.value, try await second.value)
            #expect(answers.0.body.text == "first")
            #expect(answers.1.body.text == "second")
        }
        #expect(server.log.requests.map(\.uri) == ["/first", "/second"])
        #expect(server.log.requests.map(\.connection) == [1, 2])
    }

    @Test func cancellingAWaitingRequestTakesItOutOfTheQueue() async throws {
        let gate = ScriptedGate()
        let server = try await ScriptedUpstream.start { request, reply in
            if request.uri == "/first" { await gate.wait() }
            await reply.json(request.uri)
        }
        try await withPool(server, limit: 1) { pool in
            let first = Task { try await pool.execute(upstreamRequest("/first"), collectLimit: 1024) }
            await server.until { $0.requests.count == 1 }
            let waiting = Task { try await pool.execute(upstreamRequest("/cancelled"), collectLimit: 1024) }
            waiting.cancel()
            let error = await #expect(throws: UpstreamError.self) { try await waiting.value }
            #expect(error == .cancelled)
            gate.open()
            #expect(try await first.value.body.text == "/first")
            let third = try await pool.execute(upstreamRequest("/third"), collectLimit: 1024)
            #expect(third.body.text == "/third")
        }
        // The cancelled request never went out, and the connection went on serving.
        #expect(server.log.requests.map(\.uri) == ["/first", "/third"])
        #expect(server.log.requests.map(\.connection) == [1, 1])
    }

    // MARK: Connections the server ends

    @Test func connectionTheServerClosedAfterAnAnswerIsReplaced() async throws {
        let server = try await ScriptedUpstream.start { request, reply in
            // Circuit's keep-alive timeout, as a server that ends every connection once it has answered. It ends
            // its half only, so that the connection is gone once the pool has seen that and closed its own half:
            // the test waits for that, not for the moment the server's FIN happens to reach the pool (see
            // `requestCrossingTheServersKeepAliveCloseIsRetried` for a request that goes out before then).
            await reply.json(String(buffer: request.body))
            await reply.closeOutput()
        }
        try await withPool(server, limit: 1) { pool in
            let first = try await pool.execute(upstreamRequest(body: "first"), collectLimit: 1024)
            #expect(first.body.text == "first")
            await server.until { $0.closed.contains(1) }
            let second = try await pool.execute(upstreamRequest(body: "second"), collectLimit: 1024)
            #expect(second.body.text == "second")
            await server.until { $0.closed.contains(2) }
            let third = try await pool.execute(upstreamRequest(body: "third"), collectLimit: 1024)
            #expect(third.body.text == "third")
        }
        let log = server.log
        #expect(log.accepted == 3)
        #expect(log.requests.map(\.connection) == [1, 2, 3])
    }

    @Test func requestCrossingTheServersKeepAliveCloseIsRetried() async throws {
        let server = try await ScriptedUpstream.start { request, reply in
            if request.number == 1 {
                await reply.json("fine")
            } else {
                // The server's keep-alive timeout closed the connection just as this request was on its way: it
                // is dropped unread.
                await reply.close()
            }
        }
        try await withPool(server, limit: 1) { pool in
            let first = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            #expect(first.body.text == "fine")
            // Sent on the reused connection, which the server drops: sent again on a new one.
            let second = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            #expect(second.body.text == "fine")
            // Either way, the next request gets a fresh connection.
            let third = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            #expect(third.body.text == "fine")
        }
        #expect(server.log.accepted >= 2)
        #expect(server.log.requests.first?.connection == 1)
        #expect(server.log.requests.last?.connection == server.log.accepted)
    }

    @Test func requestLostLongAfterItWasSentIsNotSentAgain() async throws {
        let server = try await ScriptedUpstream.start { request, reply in
            if request.number == 1 {
                await reply.json("fine")
            } else {
                // Circuit took the request and worked on it before the connection went: it may have acted on it.
                try? await Task.sleep(for: .milliseconds(600))
                await reply.close()
            }
        }
        try await withPool(server, limit: 1) { pool in
            let first = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            #expect(first.body.text == "fine")
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest(), collectLimit: 1024)
            }
            #expect(error?.isConnectionClosed == true, "\(String(describing: error))")
        }
        #expect(server.log.requests.count == 2)
    }

    @Test func connectionCloseAnswerIsNotReused() async throws {
        let server = try await ScriptedUpstream.start { request, reply in
            // The server announces the close but leaves the socket open: only the pool can close it.
            await reply.json(String(buffer: request.body), headers: ["Connection": "close"])
        }
        try await withPool(server) { pool in
            let first = try await pool.execute(upstreamRequest(body: "first"), collectLimit: 1024)
            #expect(first.body.text == "first")
            await server.until { $0.closed.contains(1) }
            let second = try await pool.execute(upstreamRequest(body: "second"), collectLimit: 1024)
            #expect(second.body.text == "second")
        }
        let log = server.log
        #expect(log.accepted == 2)
        #expect(log.requests.map(\.connection) == [1, 2])
    }

    @Test func idleConnectionsAreClosedAfterTheIdleTimeout() async throws {
        let server = try await ScriptedUpstream.start { _, reply in await reply.json("fine") }
        try await withPool(server, idleTimeout: .milliseconds(200)) { pool in
            let first = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            #expect(first.body.text == "fine")
            // The pool closes it (the server never does).
            await server.until { $0.closed.contains(1) }
            let second = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            #expect(second.body.text == "fine")
        }
        #expect(server.log.requests.map(\.connection) == [1, 2])
    }

    // MARK: Answers too large

    @Test(arguments: ["/announced", "/chunked"])
    func nonStreamedAnswerLargerThanTheLimitIsBroken(path: String) async throws {
        let server = try await ScriptedUpstream.start { request, reply in
            switch request.uri {
            case "/announced":
                await reply.json(String(repeating: "x", count: 1001))
            case "/chunked":
                await reply.head(.ok, ["Content-Type": "application/json"])
                for _ in 0..<4 { await reply.body(String(repeating: "x", count: 300)) }
                await reply.end()
            default:
                await reply.json(String(repeating: "y", count: 1000))
            }
        }
        try await withPool(server) { pool in
            let response = try await pool.execute(upstreamRequest(path), collectLimit: 1000)
            #expect(response.status == .ok)
            if path == "/chunked" {
                #expect(response.headers["transfer-encoding"] == ["chunked"])
            } else {
                #expect(response.headers["content-length"] == ["1001"])
            }
            #expect(response.body.failure == .answerTooLarge)
            // An answer of exactly the limit is whole, and the pool goes on.
            let exact = try await pool.execute(upstreamRequest("/exact"), collectLimit: 1000)
            #expect(exact.body.text == String(repeating: "y", count: 1000))
        }
        #expect(server.log.requests.map(\.connection) == [1, 2])
    }

    // MARK: Timeouts

    @Test func silentServerTimesOut() async throws {
        let release = ScriptedGate()
        let server = try await ScriptedUpstream.start { _, reply in
            await release.wait()
            await reply.json("too late")
        }
        try await withPool(server, readTimeout: .seconds(1)) { pool in
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest(), collectLimit: 1024)
            }
            #expect(error == .timedOut)
            await server.until { $0.closed.contains(1) }
        }
        release.open()
    }

    @Test func headThenStallBreaksTheBodyWithATimeout() async throws {
        let release = ScriptedGate()
        let server = try await ScriptedUpstream.start { _, reply in
            await reply.head(.ok, ["Content-Type": "application/json", "Content-Length": "100"])
            await reply.body("0123456789")
            await release.wait()
        }
        try await withPool(server, readTimeout: .seconds(1)) { pool in
            // The head has arrived: the failure is in the body, as for any non-streamed answer cut short.
            let response = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            #expect(response.status == .ok)
            #expect(response.body.failure == .timedOut)
            await server.until { $0.closed.contains(1) }
        }
        release.open()
    }

    @Test func streamThatStallsTimesOut() async throws {
        let release = ScriptedGate()
        let server = try await ScriptedUpstream.start { request, reply in
            await reply.head(.ok, ["Content-Type": "text/event-stream"])
            if request.uri == "/midway" {
                await reply.body("data: 1\n\n")
                await reply.body("data: 2\n\n")
            }
            await release.wait()
        }
        try await withPool(server, readTimeout: .seconds(1)) { pool in
            for path in ["/midway", "/at-once"] {
                let response = try await pool.execute(upstreamRequest(path), collectLimit: 1024)
                let body = try #require(response.body.stream)
                var received = ""
                let error = await #expect(throws: UpstreamError.self) {
                    for try await chunk in body { received += String(buffer: chunk) }
                }
                #expect(error == .timedOut)
                #expect(received == (path == "/midway" ? "data: 1\n\ndata: 2\n\n" : ""))
            }
            await server.until { $0.closed.count == 2 }
        }
        release.open()
    }

    // MARK: Broken connections

    @Test func serverClosingMidBodyBreaksTheBody() async throws {
        let server = try await ScriptedUpstream.start { _, reply in
            await reply.head(.ok, ["Content-Type": "application/json", "Content-Length": "100"])
            await reply.body("0123456789")
            await reply.close()
        }
        try await withPool(server) { pool in
            let response = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            #expect(response.status == .ok)
            let failure = try #require(response.body.failure)
            #expect(failure.isConnectionClosed, "\(failure)")
        }
    }

    @Test func serverClosingBeforeTheHeadFailsTheRequest() async throws {
        let server = try await ScriptedUpstream.start { _, reply in await reply.close() }
        try await withPool(server) { pool in
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest(), collectLimit: 1024)
            }
            #expect(error?.isConnectionClosed == true, "\(String(describing: error))")
        }
        #expect(server.log.requests.count == 1)
    }

    @Test func serverClosingRightAfterAcceptingFailsTheRequest() async throws {
        let server = try await ScriptedUpstream.start(closesOnAccept: true) { _, reply in await reply.json("never") }
        try await withPool(server) { pool in
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest(), collectLimit: 1024)
            }
            #expect(error?.isConnectionClosed == true, "\(String(describing: error))")
        }
        #expect(server.log.accepted == 1)
        #expect(server.log.requests.isEmpty)
    }

    @Test func refusedConnectionFailsToConnect() async throws {
        let refusing = try RefusingPort()
        try await withPool(port: refusing.port, limit: 1, readTimeout: .seconds(2)) { pool in
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest(), collectLimit: 1024)
            }
            #expect(error?.isConnectFailed == true, "\(String(describing: error))")
            // And again: a failed attempt does not hold the pool's one connection (this would wait, and time out).
            let again = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest(), collectLimit: 1024)
            }
            #expect(again?.isConnectFailed == true, "\(String(describing: again))")
        }
    }

    // MARK: Streams

    @Test func streamChunksArriveInOrderAsTheyAreSent() async throws {
        let steps = (0..<5).map { _ in ScriptedGate() }
        let server = try await ScriptedUpstream.start { _, reply in
            await reply.head(.ok, ["Content-Type": "text/event-stream; charset=utf-8"])
            for (index, step) in steps.enumerated() {
                await reply.body("data: \(index)\n\n")
                // The next chunk goes only once the client has read this one: the pool holds nothing back.
                await step.wait()
            }
            await reply.body("data: [DONE]\n\n")
            await reply.end()
        }
        let expected = (0..<5).map { "data: \($0)\n\n" }.joined() + "data: [DONE]\n\n"
        try await withPool(server) { pool in
            let response = try await pool.execute(upstreamRequest(), collectLimit: 16)
            #expect(response.status == .ok)
            #expect(response.headers.first(name: "content-type") == "text/event-stream; charset=utf-8")
            let body = try #require(response.body.stream)
            var iterator = body.makeAsyncIterator()
            var received = ""
            for (index, step) in steps.enumerated() {
                while !received.hasSuffix("data: \(index)\n\n") {
                    let chunk = try await iterator.next()
                    received += String(buffer: try #require(chunk))
                }
                step.open()
            }
            while let chunk = try await iterator.next() { received += String(buffer: chunk) }
            #expect(received == expected)
            // A stream read to its end gives its connection back.
            let again = try await pool.execute(upstreamRequest(), collectLimit: 16)
            #expect(try await collect(try #require(again.body.stream)) == expected)
        }
        #expect(server.log.accepted == 1)
        #expect(server.log.requests.map(\.connection) == [1, 1])
    }

    @Test func slowReaderGetsAWholeBurstIntact() async throws {
        let size = 2 << 20
        var burst = ByteBuffer()
        burst.writeBytes((0..<size).map { UInt8(truncatingIfNeeded: $0 % 251) })
        let sent = burst
        let server = try await ScriptedUpstream.start { _, reply in
            await reply.send([
                .head(HTTPResponseHead(version: .http1_1, status: .ok, headers: ["Content-Type": "text/event-stream"])),
                .body(.byteBuffer(sent)),
                .end(nil),
            ])
        }
        try await withPool(server, readTimeout: .seconds(1)) { pool in
            let response = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            let body = try #require(response.body.stream)
            var received = ByteBuffer()
            var reads = 0
            var largest = 0
            for try await chunk in body {
                // A reader slower than Circuit: first a pause longer than the read timeout (waiting for the
                // client is not Circuit's silence), then a little time for every read.
                try await Task.sleep(for: .milliseconds(reads == 0 ? 2_000 : 5))
                reads += 1
                largest = max(largest, chunk.readableBytes)
                var chunk = chunk
                received.writeBuffer(&chunk)
            }
            #expect(received.readableBytes == size)
            #expect(received == sent)
            // Reading from Circuit paused while the reader was behind: the burst came in several parts.
            #expect(reads >= 4, "reads: \(reads), largest: \(largest)")
            #expect(largest <= 1 << 20, "reads: \(reads), largest: \(largest)")
        }
    }

    @Test func cancellingAStreamClosesItsConnection() async throws {
        let release = ScriptedGate()
        let server = try await ScriptedUpstream.start { request, reply in
            if request.uri == "/stream" {
                await reply.head(.ok, ["Content-Type": "text/event-stream"])
                await reply.body("data: 1\n\n")
                await release.wait()
                await reply.body("data: 2\n\n")
                await reply.end()
            } else {
                await reply.json("fine")
            }
        }
        try await withPool(server, limit: 1) { pool in
            let response = try await pool.execute(upstreamRequest("/stream"), collectLimit: 1024)
            let body = try #require(response.body.stream)
            var iterator = body.makeAsyncIterator()
            let first = try await iterator.next()
            #expect(first.map { String(buffer: $0) } == "data: 1\n\n")
            body.cancel()
            await server.until { $0.closed.contains(1) }
            let error = await #expect(throws: UpstreamError.self) { _ = try await iterator.next() }
            #expect(error == .cancelled)
            release.open()
            let next = try await pool.execute(upstreamRequest("/json"), collectLimit: 1024)
            #expect(next.body.text == "fine")
        }
        #expect(server.log.requests.map(\.connection) == [1, 2])
    }

    @Test func cancellingTheStreamReaderClosesItsConnection() async throws {
        let release = ScriptedGate()
        let server = try await ScriptedUpstream.start { request, reply in
            if request.uri == "/stream" {
                await reply.head(.ok, ["Content-Type": "text/event-stream"])
                await release.wait()
                await reply.end()
            } else {
                await reply.json("fine")
            }
        }
        try await withPool(server, limit: 1) { pool in
            let response = try await pool.execute(upstreamRequest("/stream"), collectLimit: 1024)
            let body = try #require(response.body.stream)
            let reader = Task { try await collect(body) }
            reader.cancel()
            let error = await #expect(throws: UpstreamError.self) { try await reader.value }
            #expect(error == .cancelled)
            await server.until { $0.closed.contains(1) }
            release.open()
            let next = try await pool.execute(upstreamRequest("/json"), collectLimit: 1024)
            #expect(next.body.text == "fine")
        }
        #expect(server.log.requests.map(\.connection) == [1, 2])
    }

    // MARK: Cancellation

    @Test func cancellingARequestClosesItsConnection() async throws {
        let release = ScriptedGate()
        let server = try await ScriptedUpstream.start { request, reply in
            if request.uri == "/held" { await release.wait() }
            await reply.json(String(buffer: request.body))
        }
        try await withPool(server, limit: 1) { pool in
            let held = Task { try await pool.execute(upstreamRequest("/held", body: "stale"), collectLimit: 1024) }
            await server.until { $0.requests.count == 1 }
            held.cancel()
            let error = await #expect(throws: UpstreamError.self) { try await held.value }
            #expect(error == .cancelled)
            await server.until { $0.closed.contains(1) }
            // The held answer is sent now, into a connection that is gone.
            release.open()
            let fresh = try await pool.execute(upstreamRequest("/fresh", body: "fresh"), collectLimit: 1024)
            #expect(fresh.body.text == "fresh")
        }
        #expect(server.log.requests.map(\.connection) == [1, 2])
    }

    @Test func shutDownPoolRefusesRequests() async throws {
        let server = try await ScriptedUpstream.start { _, reply in await reply.json("fine") }
        try await withPool(server) { pool in
            let first = try await pool.execute(upstreamRequest(), collectLimit: 1024)
            #expect(first.body.text == "fine")
            await pool.shutdown()
            // Its idle connection is closed…
            await server.until { $0.closed.contains(1) }
            // …and no request goes out any more.
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest(), collectLimit: 1024)
            }
            #expect(error == .shutDown)
        }
        #expect(server.log.accepted == 1)
        #expect(server.log.requests.count == 1)
    }

    // MARK: TLS

    @Test func tlsWithATrustedCertificate() async throws {
        let (certificate, context) = try tlsServer()
        let handler: ScriptedUpstream.Script = { request, reply in await reply.json(String(buffer: request.body)) }

        // Trusting the certificate: verified against the address, 127.0.0.1, which it names.
        let trustedServer = try await ScriptedUpstream.start(tls: context, script: handler)
        var trusting = TLSConfiguration.makeClientConfiguration()
        trusting.trustRoots = .certificates([certificate])
        try await withPool(trustedServer, scheme: "https", tls: trusting) { pool in
            for body in ["first", "second"] {
                let response = try await pool.execute(upstreamRequest(body: body), collectLimit: 1024)
                #expect(response.body.text == body)
            }
        }
        #expect(trustedServer.log.accepted == 1)
        #expect(trustedServer.log.requests.count == 2)

        // The same configuration without that trust: the handshake fails, and nothing is sent.
        let untrustedServer = try await ScriptedUpstream.start(tls: context, script: handler)
        try await withPool(untrustedServer, scheme: "https", tls: .makeClientConfiguration()) { pool in
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest(), collectLimit: 1024)
            }
            #expect(error?.isConnectFailed == true, "\(String(describing: error))")
            #expect(error?.description.contains("TLS") == true, "\(String(describing: error))")
        }
        #expect(untrustedServer.log.requests.isEmpty)
    }

    @Test func tlsCertificateForAnotherNameIsAConnectFailure() async throws {
        // Trusted, but issued for circuit.example only, while the pool connects to 127.0.0.1.
        let (certificate, context) = try tlsServer(onlyFor: "circuit.example")
        let server = try await ScriptedUpstream.start(tls: context) { _, reply in await reply.json("never") }
        var trusting = TLSConfiguration.makeClientConfiguration()
        trusting.trustRoots = .certificates([certificate])
        try await withPool(server, scheme: "https", tls: trusting) { pool in
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest(), collectLimit: 1024)
            }
            // A TLS failure before the connection is up, although not a `NIOSSLError`.
            #expect(error?.isConnectFailed == true, "\(String(describing: error))")
            #expect(error?.description.contains("TLS") == true, "\(String(describing: error))")
        }
        #expect(server.log.requests.isEmpty)
    }

    @Test func tlsServerClosingWithoutCloseNotifyBeforeTheHeadIsAClosedConnection() async throws {
        let (certificate, context) = try tlsServer()
        let server = try await ScriptedUpstream.start(tls: context) { request, reply in
            if request.uri == "/drop" {
                await reply.closeAbruptly()
            } else {
                await reply.json("fine")
            }
        }
        var trusting = TLSConfiguration.makeClientConfiguration()
        trusting.trustRoots = .certificates([certificate])
        try await withPool(server, scheme: "https", tls: trusting) { pool in
            // The connection is made and in use (a request went through on it) when Circuit drops it.
            let first = try await pool.execute(upstreamRequest("/fine"), collectLimit: 1024)
            #expect(first.body.text == "fine")
            let error = await #expect(throws: UpstreamError.self) {
                try await pool.execute(upstreamRequest("/drop"), collectLimit: 1024)
            }
            // Not a failure to connect (TLS reports it as `NIOSSLError.uncleanShutdown`).
            #expect(error?.isConnectionClosed == true, "\(String(describing: error))")
        }
        // Dropped on the reused connection, the request went once more, on a new one, which dropped it too: no
        // third attempt.
        #expect(server.log.requests.map(\.connection) == [1, 1, 2])
    }

    // MARK: The endpoint

    @Test func endpointFromHTTPSURLWithoutAPort() throws {
        let endpoint = UpstreamEndpoint(try #require(UpstreamURL(validating: "https://circuit.example")))
        #expect(endpoint.usesTLS)
        #expect(endpoint.host == "circuit.example")
        #expect(endpoint.port == 443)
        #expect(endpoint.path == "")
        #expect(endpoint.hostHeader == "circuit.example")
        #expect(!endpoint.hostIsAddress)
    }

    @Test func endpointFromHTTPURLWithAPortAndAPath() throws {
        let endpoint = UpstreamEndpoint(try #require(UpstreamURL(validating: "http://circuit.example:8080/base/")))
        #expect(!endpoint.usesTLS)
        #expect(endpoint.host == "circuit.example")
        #expect(endpoint.port == 8080)
        #expect(endpoint.path == "/base")
        #expect(endpoint.hostHeader == "circuit.example:8080")
        #expect(!endpoint.hostIsAddress)
    }

    @Test func endpointFromIPAddresses() throws {
        let v6 = UpstreamEndpoint(try #require(UpstreamURL(validating: "http://[::1]:9000")))
        #expect(v6.host == "::1")
        #expect(v6.port == 9000)
        #expect(v6.hostHeader == "[::1]:9000")
        #expect(v6.hostIsAddress)
        let v4 = UpstreamEndpoint(try #require(UpstreamURL(validating: "https://127.0.0.1:443/")))
        #expect(v4.usesTLS)
        #expect(v4.host == "127.0.0.1")
        #expect(v4.port == 443)
        #expect(v4.path == "")
        #expect(v4.hostHeader == "127.0.0.1")
        #expect(v4.hostIsAddress)
    }
}

// MARK: - Helpers

/// A chat-like request to the scripted server.
private func upstreamRequest(_ uri: String = "/x", body: String = "{}", apiKey: String? = nil) -> UpstreamRequest {
    var headers: HTTPHeaders = [
        "Host": "upstream.test", "Content-Type": "application/json", "Content-Length": String(body.utf8.count),
    ]
    if let apiKey { headers.add(name: "api-key", value: apiKey) }
    return UpstreamRequest(
        head: HTTPRequestHead(version: .http1_1, method: .POST, uri: uri, headers: headers),
        body: ByteBuffer(string: body)
    )
}

/// A certificate for a TLS server and the server's context: from `cert generate` (naming localhost, 127.0.0.1 and
/// ::1), or, with `name`, one naming `name` alone.
private func tlsServer(onlyFor name: String? = nil) throws -> (NIOSSLCertificate, NIOSSLContext) {
    let material = try CertificateFactory(hostname: name ?? "localhost", validityDays: 2).make()
    var pem = material.certificatePEM
    if let name {
        let key = try Certificate.PrivateKey(pemEncoded: material.privateKeyPEM)
        let subject = try DistinguishedName { CommonName(name) }
        let now = Date()
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-300),
            notValidAfter: now.addingTimeInterval(86_400),
            issuer: subject,
            subject: subject,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true, keyCertSign: true))
                try ExtendedKeyUsage([.serverAuth])
                SubjectAlternativeNames([.dnsName(name)])
            },
            issuerPrivateKey: key
        )
        pem = try certificate.serializeAsPEM().pemString
    }
    let certificate = try NIOSSLCertificate(bytes: Array(pem.utf8), format: .pem)
    let key = try NIOSSLPrivateKey(bytes: Array(material.privateKeyPEM.utf8), format: .pem)
    let context = try NIOSSLContext(
        configuration: .makeServerConfiguration(certificateChain: [.certificate(certificate)], privateKey: .privateKey(key))
    )
    return (certificate, context)
}

/// Runs `body` with a pool on a one-thread event loop group of its own, with `server` as Circuit, then shuts the
/// pool, its group and the server down, on every path. Unless a test is about timeouts, the read timeout is longer
/// than the suite's time limit: a connection the pool should close at once must not be closed by a timeout instead.
private func withPool(
    _ server: ScriptedUpstream,
    scheme: String = "http",
    limit: Int = 4,
    loops: Int = 1,
    readTimeout: TimeAmount = .seconds(120),
    idleTimeout: TimeAmount = .seconds(60),
    tls: TLSConfiguration? = nil,
    _ body: (UpstreamConnectionPool) async throws -> Void
) async throws {
    do {
        try await withPool(
            port: server.port,
            scheme: scheme,
            limit: limit,
            loops: loops,
            readTimeout: readTimeout,
            idleTimeout: idleTimeout,
            tls: tls,
            body
        )
    } catch {
        await server.stop()
        throw error
    }
    await server.stop()
}

private func withPool(
    port: Int,
    scheme: String = "http",
    limit: Int = 4,
    loops: Int = 1,
    readTimeout: TimeAmount = .seconds(120),
    idleTimeout: TimeAmount = .seconds(60),
    tls: TLSConfiguration? = nil,
    _ body: (UpstreamConnectionPool) async throws -> Void
) async throws {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: loops)
    var settings = UpstreamConnectionPool.Settings(readTimeout: readTimeout, maximumConnections: limit)
    settings.idleTimeout = idleTimeout
    let pool: UpstreamConnectionPool
    do {
        let url = try #require(UpstreamURL(validating: "\(scheme)://127.0.0.1:\(port)"))
        pool = try UpstreamConnectionPool(endpoint: UpstreamEndpoint(url), settings: settings, tls: tls, group: group)
    } catch {
        try? await group.shutdownGracefully()
        throw error
    }
    do {
        try await body(pool)
    } catch {
        await pool.shutdown()
        try? await group.shutdownGracefully()
        throw error
    }
    await pool.shutdown()
    try await group.shutdownGracefully()
}

/// A streamed body read to its end, as text.
private func collect(_ body: UpstreamBody) async throws -> String {
    var text = ""
    for try await chunk in body { text += String(buffer: chunk) }
    return text
}

extension UpstreamResponse.Body {
    /// The whole body, when it arrived whole.
    var text: String? {
        if case .complete(let buffer) = self { String(buffer: buffer) } else { nil }
    }

    var stream: UpstreamBody? {
        if case .stream(let body) = self { body } else { nil }
    }

    /// Why the body did not arrive whole.
    var failure: UpstreamError? {
        if case .broken(let error) = self { error } else { nil }
    }
}

extension UpstreamError {
    var isConnectionClosed: Bool {
        if case .connectionClosed = self { true } else { false }
    }

    var isConnectFailed: Bool {
        if case .connectFailed = self { true } else { false }
    }
}

/// Opens once, for every waiter then and later.
private final class ScriptedGate: Sendable {
    private let state = NIOLockedValueBox<(isOpen: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func wait() async {
        await withCheckedContinuation { continuation in
            let isOpen = state.withLockedValue { state in
                if !state.isOpen { state.waiters.append(continuation) }
                return state.isOpen
            }
            if isOpen { continuation.resume() }
        }
    }

    func open() {
        let waiters = state.withLockedValue { state in
            state.isOpen = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }
}

/// A real HTTP/1.1 server on a loopback port, answering each request with a script, and recording connections and
/// requests. Connections are numbered from 1 in the order they are accepted.
private struct ScriptedUpstream: Sendable {
    typealias Script = @Sendable (Received, Reply) async -> Void

    struct Received: Sendable {
        var connection: Int
        /// 1 for the connection's first request, and so on.
        var number: Int
        var method: HTTPMethod
        var uri: String
        var headers: HTTPHeaders
        var body: ByteBuffer
    }

    struct Log: Sendable {
        var accepted = 0
        var open = 0
        /// The most connections open at once.
        var maxOpen = 0
        /// Connections closed (by either side), in order.
        var closed: [Int] = []
        var requests: [Received] = []
    }

    let port: Int
    private let channel: any Channel
    private let recorder: Recorder

    /// `closesOnAccept`: closes every connection as soon as it is accepted, without reading from it.
    static func start(
        tls: NIOSSLContext? = nil,
        closesOnAccept: Bool = false,
        script: @escaping Script
    ) async throws -> ScriptedUpstream {
        let recorder = Recorder(script: script, closesOnAccept: closesOnAccept)
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(RawCloser())
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(ScriptedHandler(recorder: recorder))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return ScriptedUpstream(port: try #require(channel.localAddress?.port), channel: channel, recorder: recorder)
    }

    var log: Log { recorder.log }

    /// Returns once the log satisfies `condition` (at once if it does already).
    func until(_ condition: @escaping @Sendable (Log) -> Bool) async {
        await recorder.until(condition)
    }

    /// Stops listening and closes the connections still open.
    func stop() async {
        try? await channel.close()
        for connection in recorder.connections { try? await connection.close() }
    }

    /// One connection's way to answer: every method returns once its bytes are written (or failed to be).
    struct Reply: Sendable {
        let channel: any Channel

        func head(_ status: HTTPResponseStatus = .ok, _ headers: HTTPHeaders) async {
            await send([.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))])
        }

        func body(_ text: String) async {
            await body(ByteBuffer(string: text))
        }

        func body(_ bytes: ByteBuffer) async {
            await send([.body(.byteBuffer(bytes))])
        }

        func end() async {
            await send([.end(nil)])
        }

        /// A whole JSON answer with its `Content-Length`.
        func json(_ text: String, headers extra: HTTPHeaders = [:]) async {
            var headers: HTTPHeaders = ["Content-Type": "application/json", "Content-Length": String(text.utf8.count)]
            headers.add(contentsOf: extra)
            await send([
                .head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)),
                .body(.byteBuffer(ByteBuffer(string: text))),
                .end(nil),
            ])
        }

        /// Writes `parts` in one go on the connection's event loop.
        func send(_ parts: [HTTPServerResponsePart]) async {
            let channel = channel
            try? await channel.eventLoop.flatSubmit {
                var written = channel.eventLoop.makeSucceededVoidFuture()
                for part in parts { written = channel.write(part) }
                channel.flush()
                return written
            }.get()
        }

        func close() async {
            try? await channel.close()
        }

        /// Ends the server's half of the connection (the client sees the end, as of a close).
        func closeOutput() async {
            try? await channel.close(mode: .output)
        }

        /// Closes the connection under TLS, without TLS's close_notify (as a server that just drops it).
        func closeAbruptly() async {
            let channel = channel
            try? await channel.eventLoop.flatSubmit {
                let promise = channel.eventLoop.makePromise(of: Void.self)
                do {
                    try channel.pipeline.syncOperations.context(handlerType: RawCloser.self).close(promise: promise)
                } catch {
                    channel.close(promise: promise)
                }
                return promise.futureResult
            }.get()
        }
    }

    /// What the server has seen, and who waits for what.
    fileprivate final class Recorder: Sendable {
        let script: Script
        let closesOnAccept: Bool
        private let state = NIOLockedValueBox(State())

        private struct State {
            var log = Log()
            var connections: [any Channel] = []
            var waiters: [Int: Waiter] = [:]
            var nextWaiter = 0
        }

        private struct Waiter {
            var condition: @Sendable (Log) -> Bool
            var continuation: CheckedContinuation<Void, Never>
        }

        init(script: @escaping Script, closesOnAccept: Bool) {
            self.script = script
            self.closesOnAccept = closesOnAccept
        }

        var log: Log { state.withLockedValue { $0.log } }
        var connections: [any Channel] { state.withLockedValue { $0.connections } }

        func accepted(_ channel: any Channel) -> Int {
            var number = 0
            update { state in
                state.log.accepted += 1
                state.log.open += 1
                state.log.maxOpen = max(state.log.maxOpen, state.log.open)
                state.connections.append(channel)
                number = state.log.accepted
            }
            return number
        }

        func closed(_ connection: Int) {
            update { state in
                state.log.open -= 1
                state.log.closed.append(connection)
            }
        }

        func received(_ request: Received) {
            update { $0.log.requests.append(request) }
        }

        func until(_ condition: @escaping @Sendable (Log) -> Bool) async {
            let id = state.withLockedValue { state in
                state.nextWaiter += 1
                return state.nextWaiter
            }
            await withTaskCancellationHandler {
                await withCheckedContinuation { continuation in
                    let isMet = state.withLockedValue { state in
                        if condition(state.log) || Task.isCancelled { return true }
                        state.waiters[id] = Waiter(condition: condition, continuation: continuation)
                        return false
                    }
                    if isMet { continuation.resume() }
                }
            } onCancel: {
                state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.continuation.resume()
            }
        }

        private func update(_ change: (inout State) -> Void) {
            let met = state.withLockedValue { state in
                change(&state)
                var met: [CheckedContinuation<Void, Never>] = []
                for (id, waiter) in state.waiters where waiter.condition(state.log) {
                    met.append(waiter.continuation)
                    state.waiters[id] = nil
                }
                return met
            }
            for continuation in met { continuation.resume() }
        }
    }
}

/// Records a connection's requests and hands each, once whole, to the script.
private final class ScriptedHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart

    private let recorder: ScriptedUpstream.Recorder
    private var connection = 0
    private var requests = 0
    private var head: HTTPRequestHead?
    private var body = ByteBuffer()

    init(recorder: ScriptedUpstream.Recorder) {
        self.recorder = recorder
    }

    func channelActive(context: ChannelHandlerContext) {
        connection = recorder.accepted(context.channel)
        context.fireChannelActive()
        if recorder.closesOnAccept { context.close(promise: nil) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        recorder.closed(connection)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            body.clear()
        case .body(var chunk):
            body.writeBuffer(&chunk)
        case .end:
            guard let head else { return }
            requests += 1
            let request = ScriptedUpstream.Received(
                connection: connection,
                number: requests,
                method: head.method,
                uri: head.uri,
                headers: head.headers,
                body: body
            )
            recorder.received(request)
            let reply = ScriptedUpstream.Reply(channel: context.channel)
            let script = recorder.script
            Task { await script(request, reply) }
        }
    }
}

/// Sits below TLS, so that closing from here skips TLS's closing handshake.
private final class RawCloser: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
}
