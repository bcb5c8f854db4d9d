import CircuitFakes
import Foundation
import HTTPTypes
import NIOCore
import NIOHTTP1
import NIOHTTPTypesHTTP1
import ServiceLifecycle
import Testing

@testable import OAIToCircuit

/// The bridge's own HTTP/1.1 server (`HTTPListener`, `ExchangeHandler`), over bare TCP connections: what ordinary
/// clients rarely send, and what must happen to the connection afterwards.
@Suite(.timeLimit(.minutes(1))) struct ServerTests {
    static func chat(_ body: String, headers: String = "") -> String {
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer \(Harness.subkey)\r\n"
            + "Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\(headers)\r\n\(body)"
    }

    static let health = "GET /health HTTP/1.1\r\nHost: bridge\r\n\r\n"

    @Test func pipelinedRequestsAreAnsweredInOrderOnOneConnection() async throws {
        try await Harness.with { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            // Three requests in one write: the second is a chat, so the third waits for Circuit's answer to it.
            try await connection.send(Self.health + Self.chat(Harness.chatBody()) + "GET /nowhere HTTP/1.1\r\nHost: b\r\n\r\n")
            let first = try #require(try await connection.response())
            #expect(first.status == 200 && first.body.contains(#""status": "healthy""#))
            #expect(first.header("date")?.hasSuffix(" GMT") == true)
            let second = try #require(try await connection.response())
            #expect(second.status == 200 && second.body.contains("chat.completion"))
            let third = try #require(try await connection.response())
            #expect(third.status == 404 && third.body.contains(#""code": "not_found""#))
            await connection.close()
        }
    }

    @Test func aRequestPipelinedAfterConnectionCloseIsDroppedNotAnswered() async throws {
        try await Harness.with { harness async throws in
            for first in ["GET /health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n", "GET /health HTTP/1.0\r\n\r\n"] {
                let connection = try await RawConnection(port: harness.httpPort!)
                try await connection.send(first + Self.chat(Harness.chatBody()))
                let answer = try #require(try await connection.response())
                #expect(answer.status == 200 && answer.header("connection") == "close")
                // Then the connection closes. HTTP's parser refuses bytes after a closing request (NIO answers them
                // 400); the request in them is not served.
                let rest = try await connection.readsToEnd()
                #expect(rest.isEmpty || rest.hasPrefix("HTTP/1.1 400"), "\(rest)")
            }
            #expect(await harness.circuit.requests.count == 0)
        }
    }

    @Test func aChatRequestWithoutASubkeyIsRefusedFromItsHead() async throws {
        try await Harness.with { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            let body = Harness.chatBody()
            // No body sent: the refusal must not wait for it (the bridge holds no body for an unknown client).
            try await connection.send(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Length: \(body.utf8.count)\r\n\r\n"
            )
            let refused = try #require(try await connection.response())
            #expect(refused.status == 401 && refused.body.contains("subkey_required"))
            try await connection.send(body + Self.health)
            #expect(try await connection.response()?.status == 200)
            await connection.close()
        }
    }

    @Test func aChatRequestWithAnUnknownSubkeyIsRefusedBeforeItsBody() async throws {
        try await Harness.with { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            let body = Harness.chatBody()
            // The subkey is checked while the body has still to come: the refusal does not wait for it.
            try await connection.send(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer not-a-key\r\n"
                    + "Content-Length: \(body.utf8.count)\r\n\r\n"
            )
            let refused = try #require(try await connection.response())
            #expect(refused.status == 403 && refused.body.contains("unauthorized_subkey"))
            // The body, when it comes, is dropped, and the connection serves on.
            try await connection.send(body + Self.health)
            #expect(try await connection.response()?.status == 200)
            await connection.close()
            #expect(await harness.circuit.requests.count == 0)
        }
    }

    @Test func aBodyCutShortIsRefusedOnceTheClientStopsSending() async throws {
        try await Harness.with { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            let request = Self.chat(Harness.chatBody())
            try await connection.send(String(request.dropLast(5)))
            // The client sends no more (half-close): the request cannot be whole. HTTP's parser answers it (a bare
            // 400) and the connection closes; the responder, waiting for the body, is told and sends nothing to Circuit.
            connection.finishSending()
            let refused = try #require(try await connection.response())
            #expect(refused.status == 400 && refused.header("connection") == "close")
            #expect(try await connection.closesWithoutMore())
            #expect(await harness.circuit.requests.count == 0)
        }
    }

    @Test func aChatBodyHTTPCannotParseIsAnsweredOnce() async throws {
        try await Harness.with { harness async throws in
            for _ in 0..<20 {
                let connection = try await RawConnection(port: harness.httpPort!)
                // The request is with its task (it waits for the body) when the chunked body turns out malformed:
                // HTTP's error handler answers 400, and the task, told, writes nothing after it.
                try await connection.send(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer \(Harness.subkey)\r\n"
                        + "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\nzz\r\n"
                )
                let refused = try #require(try await connection.response())
                #expect(refused.status == 400 && refused.header("connection") == "close")
                #expect(try await connection.closesWithoutMore())
            }
            #expect(try await harness.request(.GET, "/health").status == 200)
            #expect(await harness.circuit.requests.count == 0)
        }
    }

    @Test func anOversizedBodyIsRefusedBeforeItIsSentAndTheConnectionServesOn() async throws {
        try await Harness.with(environment: ["MAX_REQUEST_BYTES": "100"]) { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            let body = #"{"model": "gpt-4o", "pad": ""# + String(repeating: "x", count: 200) + #""}"#
            let request = Self.chat(body)
            // Only the head: the refusal comes from the announced length alone.
            let headEnd = request.range(of: "\r\n\r\n")!.upperBound
            try await connection.send(String(request[..<headEnd]))
            let refused = try #require(try await connection.response())
            #expect(refused.status == 413 && refused.body.contains("request_too_large"))
            #expect(refused.header("connection") == nil)
            // The body the client goes on sending is read and dropped; the connection then serves the next request.
            try await connection.send(String(request[headEnd...]) + Self.health)
            #expect(try await connection.response()?.status == 200)
            await connection.close()
            #expect(await harness.circuit.requests.count == 0)
        }
    }

    @Test func anOversizedChunkedBodyIsRefusedOnceItPassesTheLimit() async throws {
        try await Harness.with(environment: ["MAX_REQUEST_BYTES": "100"]) { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            try await connection.send(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer \(Harness.subkey)\r\n"
                    + "Transfer-Encoding: chunked\r\n\r\n40\r\n\(String(repeating: "a", count: 64))\r\n"
            )
            try await connection.send("40\r\n\(String(repeating: "b", count: 64))\r\n")
            #expect(try await connection.response()?.status == 413)
            try await connection.send("40\r\n\(String(repeating: "c", count: 64))\r\n0\r\n\r\n" + Self.health)
            #expect(try await connection.response()?.status == 200)
            await connection.close()
        }
    }

    @Test func expectContinueIsAnsweredBeforeTheBody() async throws {
        try await Harness.with(environment: ["MAX_REQUEST_BYTES": "1000"]) { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            let body = Harness.chatBody()
            let request = Self.chat(body, headers: "Expect: 100-continue\r\n")
            try await connection.send(String(request.dropLast(body.utf8.count)))
            #expect(try await connection.response()?.status == 100)
            try await connection.send(body)
            #expect(try await connection.response()?.status == 200)

            // Too large: refused without `100 Continue`; the client sends no body, so the connection closes.
            let big = #"{"pad": ""# + String(repeating: "x", count: 2000) + #""}"#
            let refusedRequest = Self.chat(big, headers: "Expect: 100-continue\r\n")
            try await connection.send(String(refusedRequest.dropLast(big.utf8.count)))
            let refused = try #require(try await connection.response())
            #expect(refused.status == 413 && refused.header("connection") == "close")
            #expect(try await connection.closesWithoutMore())
        }
    }

    @Test func http10KnowsNoContinue() async throws {
        try await Harness.with { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            let body = Harness.chatBody()
            // An HTTP/1.0 client sends its body at once: `100 Continue` would be read as its answer.
            try await connection.send(
                "POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer \(Harness.subkey)\r\n"
                    + "Expect: 100-continue\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
            )
            let answer = try #require(try await connection.response())
            #expect(answer.status == 200 && answer.body.contains("chat.completion"))
            #expect(try await connection.closesWithoutMore())
        }
    }

    @Test func aStreamsHeadIsNotHeldForCircuitsFirstEvent() async throws {
        try await Harness.with { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            // Circuit sends its head, then nothing until the gate opens: the client has the head meanwhile.
            try await connection.send(Self.chat(Harness.chatBody(model: "late-stream", stream: true)))
            let head = try #require(try await connection.response(headOnly: true))
            #expect(head.status == 200 && head.header("transfer-encoding") == "chunked")
            // Circuit's events then follow. (Had the head waited for them, it would have come only once the bridge
            // gave up on Circuit's silence, with an error event instead.)
            await harness.circuit.openGate()
            var stream = ""
            while !stream.contains("[DONE]") {
                stream = String(decoding: try await connection.unread(atLeast: stream.utf8.count + 1), as: UTF8.self)
            }
            #expect(stream.contains("Hello") && !stream.contains("error"))
            await connection.close()
        }
    }

    @Test func connectIsRefusedAndTheConnectionClosed() async throws {
        try await Harness.with { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            // A proxy's method: the bridge is no proxy. An answer to CONNECT has no body (HTTP's encoder drops it:
            // the client would read whatever follows as the tunnel's), so only its status tells, and the connection
            // closes.
            try await connection.send("CONNECT circuit.example:443 HTTP/1.1\r\nHost: circuit.example:443\r\n\r\n")
            let refused = try #require(try await connection.response())
            #expect(refused.status == 400 && refused.header("connection") == "close")
            #expect(try await connection.closesWithoutMore())
        }
    }

    @Test func http10WithoutKeepAliveIsAnsweredThenClosed() async throws {
        try await Harness.with { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            try await connection.send("GET /health HTTP/1.0\r\n\r\n")
            let answer = try #require(try await connection.response())
            #expect(answer.status == 200 && answer.header("connection") == "close")
            #expect(try await connection.closesWithoutMore())

            // With keep-alive asked for, the connection stays for the next request.
            let again = try await RawConnection(port: harness.httpPort!)
            try await again.send("GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            #expect(try await again.response()?.header("connection") == "keep-alive")
            try await again.send("GET /health HTTP/1.0\r\n\r\n")
            #expect(try await again.response()?.status == 200)
            #expect(try await again.closesWithoutMore())
        }
    }

    @Test func aStreamOverHTTP10EndsWithTheConnection() async throws {
        try await Harness.with { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            let body = Harness.chatBody(stream: true)
            let request =
                "POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer \(Harness.subkey)\r\n"
                + "Content-Length: \(body.utf8.count)\r\n\r\n\(body)"
            // A second request pipelined behind it is dropped with the connection, not sent to Circuit.
            try await connection.send(request + request)
            let answer = try #require(try await connection.response())
            #expect(answer.status == 200 && answer.header("connection") == "close")
            #expect(answer.header("transfer-encoding") == nil && answer.body.hasSuffix("data: [DONE]\n\n"))
            #expect(await harness.circuit.requests.count == 1)
        }
    }

    @Test func malformedRequestsAreRefusedAndTheServerServesOn() async throws {
        try await Harness.with { harness async throws in
            let garbage = try await RawConnection(port: harness.httpPort!)
            try await garbage.send("NOT HTTP AT ALL\r\n\r\n")
            #expect(try await garbage.response()?.status == 400)
            #expect(try await garbage.closesWithoutMore())

            let badHeader = try await RawConnection(port: harness.httpPort!)
            try await badHeader.send("GET /health HTTP/1.1\r\nHost: b\r\nBad Header: x\r\n\r\n")
            #expect(try await badHeader.response()?.status == 400)
            #expect(try await badHeader.closesWithoutMore())

            #expect(try await harness.request(.GET, "/health").status == 200)
        }
    }

    @Test func anIdleConnectionIsClosedButNotWhileItsAnswerIsMade() async throws {
        var settings = FakeCircuit.Settings()
        settings.headerDelay = .milliseconds(1_600)
        // Long enough that a loaded machine sends each request well inside it: a close while a request's bytes are
        // arriving unread is a reset, not the clean close this test looks for.
        try await Harness.with(circuitSettings: settings, connectionIdleTimeout: .seconds(1)) {
            harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            // Circuit takes longer than the idle timeout to answer: the connection stays for the answer.
            try await connection.send(Self.chat(Harness.chatBody(model: "slow-headers")))
            #expect(try await connection.response()?.status == 200)
            // Then nothing more comes: the server closes the connection.
            #expect(try await connection.closesWithoutMore())

            // A request whose body never finishes arriving is given up the same way.
            let stalled = try await RawConnection(port: harness.httpPort!)
            let request = Self.chat(Harness.chatBody())
            try await stalled.send(String(request.dropLast(5)))
            #expect(try await stalled.closesWithoutMore())
            #expect(await harness.circuit.requests.count == 1)
        }
    }

    @Test func aClientThatStopsReadingAStreamIsLetGo() async throws {
        try await Harness.with(connectionIdleTimeout: .milliseconds(500)) { harness async throws in
            let connection = try await RawConnection(port: harness.httpPort!)
            // The stream is far larger than every buffer between the bridge and a client that reads nothing of it.
            try await connection.send(Self.chat(Harness.chatBody(model: "flood-stream", stream: true)))
            // The bridge's writes wait, then it lets the client go, and Circuit's stream with it.
            await harness.circuit.streams.wait { !$0.isEmpty }
            #expect(
                await harness.circuit.streams.entries == [FakeCircuit.StreamOutcome(model: "flood-stream", completed: false)]
            )
            await harness.recorder.usage.wait { !$0.isEmpty }
            let record = try #require(await harness.recorder.usage.entries.first)
            #expect(record.clientDisconnected && record.isStreaming && record.statusCode == 200)
            // The connection is gone: what it still holds is read, then it ends.
            _ = try await connection.readsToEnd()
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
        }
    }

    @Test func stoppingForGoodEndsTheAnswersInProgress() async throws {
        try await Harness.with { harness async throws in
            // A listener of its own, so that it can be stopped without a grace period.
            let (ports, portSource) = AsyncStream<Int>.makeStream()
            let listeners = try BridgeServer.listeners(for: harness.bridge) { _, port in portSource.yield(port) }
            let running = Task { try await listeners.run() }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())

            let connection = try await RawConnection(port: port)
            try await connection.send(Self.chat(Harness.chatBody(model: "gated-stream", stream: true)))
            let head = try #require(try await connection.response(headOnly: true))
            #expect(head.status == 200)
            running.cancel()
            try await running.value
            // The stream was cut (Circuit's gate is still shut): the connection ends, and the request still counts.
            _ = try await connection.readsToEnd()
            await harness.recorder.usage.wait { $0.contains { $0.clientDisconnected } }
            await harness.circuit.openGate()
        }
    }
}

/// What the server and the responder read from a request's head before anything else: the path, the request as
/// HTTP's types hold it, and the subkey.
@Suite struct RequestHeadTests {
    @Test func thePathIsReadFromEveryFormOfTarget() {
        #expect(ExchangeHandler.path(of: "/v1/chat/completions") == "/v1/chat/completions")
        #expect(ExchangeHandler.path(of: "/v1/chat/completions?api-version=1#x") == "/v1/chat/completions")
        #expect(ExchangeHandler.path(of: "http://bridge:12000/v1/chat/completions?x") == "/v1/chat/completions")
        #expect(ExchangeHandler.path(of: "http://bridge") == "")
        #expect(ExchangeHandler.path(of: "*") == "*")
        #expect(ExchangeHandler.path(of: "/v1/mödels/é?q") == "/v1/mödels/é")
    }

    @Test func anOriginFormTargetIsKeptAsItIs() throws {
        for target in ["/v1/chat/completions?a=1&b=%20", "//elsewhere/v1", "/a b", "/%zz", "/v1/mödels"] {
            var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: target)
            head.headers.add(name: "Host", value: "bridge")
            head.headers.add(name: "Authorization", value: "Bearer k")
            let request = try ExchangeHandler.request(head, secure: true)
            // As NIO's own conversion has it.
            let reference = try HTTPRequest(head, secure: true, splitCookie: false)
            #expect(request == reference, "\(target)")
            #expect(request.path == target && request.scheme == "https" && request.authority == "bridge")
        }
        let absolute = HTTPRequestHead(version: .http1_1, method: .GET, uri: "http://bridge/health?x")
        #expect(try ExchangeHandler.request(absolute, secure: false).path == "/health?x")
    }

    @Test func theSubkeyIsReadFromEitherHeader() {
        func subkey(_ fields: [(HTTPField.Name, String)]) -> String? {
            BridgeResponder.subkey(in: HTTPFields(fields.map { HTTPField(name: $0.0, value: $0.1) }))
        }
        #expect(subkey([(.authorization, "Bearer sk-1")]) == "sk-1")
        #expect(subkey([(.authorization, " \tbEaReR \t sk-1 \t")]) == "sk-1")
        #expect(subkey([(.authorization, "Bearer\tsk-1")]) == "sk-1")
        #expect(subkey([(.authorization, "Bearer ключ€")]) == "ключ€")
        #expect(subkey([(.authorization, "Bearer a b")]) == "a b")
        #expect(subkey([(.authorization, "Bearer")]) == nil)
        #expect(subkey([(.authorization, "Bearer   ")]) == nil)
        #expect(subkey([(.authorization, "Bearerx sk-1")]) == nil)
        #expect(subkey([(.authorization, "Basic c2stMQ==")]) == nil)
        #expect(subkey([(.authorization, "Bèarer sk-1")]) == nil)
        #expect(subkey([(.xBridgeSubkey, "  sk-2 "), (.authorization, "Bearer sk-1")]) == "sk-2")
        #expect(subkey([(.xBridgeSubkey, " \t "), (.authorization, "Bearer sk-1")]) == "sk-1")
        #expect(subkey([]) == nil)
    }
}
