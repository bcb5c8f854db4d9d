import Foundation
import NIOCore
import NIOPosix
import Testing

@testable import OAIToCircuit

/// `/health`, `/v1/models`, `/metrics`, CORS and the access log.
@Suite(.timeLimit(.minutes(1))) struct EndpointTests {
    @Test func healthReportsConfiguration() async throws {
        try await Harness.with(environment: ["CIRCUIT_APPKEY": ""]) { harness async throws in
            let answer = try await harness.request(.GET, "/health", subkey: nil)
            #expect(answer.status == 200)
            #expect(answer.json?["status"] as? String == "healthy")
            #expect(answer.json?["service"] as? String == "OpenAI to Circuit Bridge")
            #expect(answer.json?["credentials_configured"] as? Bool == true)
            #expect(answer.json?["appkey_configured"] as? Bool == false)
        }
    }

    @Test func healthIsUnhealthyWhenAComponentSaysSo() async throws {
        let report = HealthReport(isHealthy: false, fields: [("database", #"{"error": "disk I/O error"}"#)])
        let unhealthy: (inout Bridge) -> Void = { $0.health = { report } }
        try await Harness.with(configure: unhealthy) { harness async throws in
            let answer = try await harness.request(.GET, "/health", subkey: nil)
            #expect(answer.status == 503)
            #expect(answer.json?["status"] as? String == "unhealthy")
            #expect((answer.json?["database"] as? [String: Any])?["error"] as? String == "disk I/O error")
            #expect(answer.json?["service"] as? String == "OpenAI to Circuit Bridge")
        }
    }

    @Test func headAnswersWithoutABody() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.request(.HEAD, "/health", subkey: nil)
            #expect(answer.status == 200 && answer.body.isEmpty)
            #expect(try await harness.request(.GET, "/health").status == 200)  // the connection is still in step
        }
    }

    @Test func modelsListsTheConfiguredModelsWithSubkeyRules() async throws {
        try await Harness.with(environment: ["CIRCUIT_MODELS": "gpt-4o, o3 ,gpt-4o"]) { harness async throws in
            expectError(try await harness.request(.GET, "/v1/models", subkey: nil), status: 401, code: "subkey_required")
            let answer = try await harness.request(.GET, "/v1/models")
            #expect(answer.status == 200)
            #expect(answer.json?["object"] as? String == "list")
            let data = try #require(answer.json?["data"] as? [[String: Any]])
            #expect(data.compactMap { $0["id"] as? String } == ["gpt-4o", "o3"])
            #expect(data.allSatisfy { $0["object"] as? String == "model" && $0["created"] is Int && $0["owned_by"] is String })
            let one = try await harness.request(.GET, "/v1/models/o3")
            #expect(one.json?["id"] as? String == "o3")
            expectError(try await harness.request(.GET, "/v1/models/gpt-4.1"), status: 404, code: "model_not_found")
        }
    }

    @Test func defaultModelsAreTheSevenKnownOnes() async throws {
        try await Harness.with { harness async throws in
            let data = try #require(try await harness.request(.GET, "/v1/models").json?["data"] as? [[String: Any]])
            #expect(data.compactMap { $0["id"] as? String } == BridgeConfiguration.knownModels)
        }
    }

    @Test func metricsCountRequestsWithBoundedModelLabels() async throws {
        try await Harness.with(environment: ["CIRCUIT_MODELS": "gpt-4o"]) { harness async throws in
            _ = try await harness.chat(Harness.chatBody())
            _ = try await harness.chat(Harness.chatBody(model: "some-model-1"))
            _ = try await harness.chat(Harness.chatBody(model: "some-model-2"))
            _ = try await harness.chat("nope")
            let text = try await harness.request(.GET, "/metrics", subkey: nil).body
            #expect(text.contains(#"oai_to_circuit_requests_total{route="/v1/chat/completions",status="200",model="gpt-4o"} 1"#))
            #expect(text.contains(#"oai_to_circuit_requests_total{route="/v1/chat/completions",status="200",model="other"} 2"#))
            #expect(text.contains(#"oai_to_circuit_requests_total{route="/v1/chat/completions",status="400",model="none"} 1"#))
            #expect(!text.contains("some-model"))
            #expect(text.contains(#"oai_to_circuit_tokens_total{model="gpt-4o",kind="prompt"} 11"#))
            #expect(text.contains(#"oai_to_circuit_tokens_total{model="gpt-4o",kind="completion"} 7"#))
            #expect(text.contains("oai_to_circuit_token_refreshes_total 1"))
            #expect(text.contains("oai_to_circuit_token_refresh_failures_total 0"))
            #expect(text.contains(#"oai_to_circuit_request_duration_seconds_count{route="/v1/chat/completions"} 4"#))
            #expect(text.contains(#"oai_to_circuit_upstream_duration_seconds_count{model="other"} 2"#))
        }
    }

    @Test func corsIsOffByDefault() async throws {
        try await Harness.with { harness async throws in
            let answer = try await harness.request(.GET, "/v1/models", headers: [("Origin", "https://chat.example")])
            #expect(answer.headers.first(name: "access-control-allow-origin") == nil)
            expectError(
                try await harness.request(
                    .OPTIONS,
                    "/v1/chat/completions",
                    subkey: nil,
                    headers: [("Origin", "https://chat.example"), ("Access-Control-Request-Method", "POST")]
                ),
                status: 405,
                code: "method_not_allowed"
            )
        }
    }

    @Test func corsAllowsListedOriginsAndAnswersPreflight() async throws {
        try await Harness.with(environment: ["CORS_ALLOW_ORIGINS": "https://chat.example, https://other.example"]) {
            harness async throws in
            let preflight = try await harness.request(
                .OPTIONS,
                "/v1/chat/completions",
                subkey: nil,
                headers: [
                    ("Origin", "https://chat.example"), ("Access-Control-Request-Method", "POST"),
                    ("Access-Control-Request-Headers", "authorization, content-type"),
                ]
            )
            #expect(preflight.status == 204)
            #expect(preflight.headers.first(name: "access-control-allow-origin") == "https://chat.example")
            #expect(preflight.headers.first(name: "access-control-allow-methods")?.contains("POST") == true)
            #expect(preflight.headers.first(name: "access-control-allow-headers") == "authorization, content-type")
            let chat = try await harness.chat(Harness.chatBody(), headers: [("Origin", "https://other.example")])
            #expect(chat.headers.first(name: "access-control-allow-origin") == "https://other.example")
            #expect(chat.headers.first(name: "access-control-expose-headers")?.contains("X-Request-ID") == true)
            let stranger = try await harness.chat(Harness.chatBody(), headers: [("Origin", "https://evil.example")])
            #expect(stranger.headers.first(name: "access-control-allow-origin") == nil)
            let health = try await harness.request(.GET, "/health", headers: [("Origin", "https://chat.example")])
            #expect(health.headers.first(name: "access-control-allow-origin") == nil)
        }
    }

    @Test func corsWildcard() async throws {
        try await Harness.with(environment: ["CORS_ALLOW_ORIGINS": "*"]) { harness async throws in
            let answer = try await harness.request(.GET, "/v1/models", headers: [("Origin", "https://any.example")])
            #expect(answer.headers.first(name: "access-control-allow-origin") == "*")
        }
    }

    @Test func accessLogHasOneLinePerRequestAndNoSecretAtAnyLevel() async throws {
        try await Harness.with(environment: ["CIRCUIT_CLIENT_SECRET": "client-secret"]) { harness async throws in
            _ = try await harness.chat(Harness.chatBody(), headers: [("X-Request-ID", "log-check-1")])
            _ = try await harness.chat(Harness.chatBody(stream: true), headers: [("X-Request-ID", "log-check-2")])
            harness.tokens.revoke("access-token-1")
            _ = try await harness.chat(Harness.chatBody(), subkey: "sk-second-secret-key")
            _ = try await harness.chat(Harness.chatBody(), subkey: nil, headers: [("X-Bridge-Subkey", "sk-third-secret")])
            let lines = harness.logs.all
            let first = lines.filter { $0.contains("request_id=log-check-1") && $0.hasPrefix("info request ") }
            #expect(first.count == 1)
            for field in [
                "method=POST", "path=/v1/chat/completions", "status=200", "model=gpt-4o", "duration_ms=", "client=127.0.0.1",
            ] {
                #expect(first.first?.contains(field) == true, "\(field) missing")
            }
            #expect(lines.filter { $0.contains("request_id=log-check-2") && $0.hasPrefix("info request ") }.count == 1)
            let everything = lines.joined(separator: "\n").lowercased()
            let secrets = [
                Harness.subkey, "sk-second-secret-key", "sk-third-secret", "client-secret", "access-token-1", "access-token-2",
            ]
            for secret in secrets {
                // Plain, base64 (as in a Basic header) and hex (as in a byte dump).
                let hex = secret.utf8.map { String(format: "%02x", $0) }.joined()
                for form in [secret, Data(secret.utf8).base64EncodedString(), hex] {
                    #expect(!everything.contains(form.lowercased()), "\(secret) was logged")
                }
            }
            #expect(!everything.contains(Data("client-id:client-secret".utf8).base64EncodedString().lowercased()))
        }
    }
}

/// A client that half-closes its connection after sending (as `nc -N` does) still gets its answer.
@Suite(.timeLimit(.minutes(1))) struct HalfCloseTests {
    /// Collects everything the server sends until it closes.
    final class Collector: ChannelInboundHandler, @unchecked Sendable {
        // Touched only on the channel's event loop; the promise hands the result over.
        typealias InboundIn = ByteBuffer
        var received = ""
        let done: EventLoopPromise<String>
        init(done: EventLoopPromise<String>) { self.done = done }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            received += String(buffer: unwrapInboundIn(data))
        }
        func channelInactive(context: ChannelHandlerContext) { done.succeed(received) }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case ChannelEvent.inputClosed = event { context.close(promise: nil) }
        }
    }

    @Test func halfClosedClientStillGetsItsAnswer() async throws {
        try await Harness.with { harness async throws in
            let group = MultiThreadedEventLoopGroup.singleton
            let done = group.next().makePromise(of: String.self)
            let channel = try await ClientBootstrap(group: group)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(Collector(done: done))
                    }
                }
                .connect(host: "127.0.0.1", port: harness.httpPort!).get()
            let body = Harness.chatBody()
            let request =
                "POST /v1/chat/completions HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer \(Harness.subkey)\r\n"
                + "Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
            try await channel.writeAndFlush(ByteBuffer(string: request)).get()
            try await channel.close(mode: .output).get()
            let answer = try await done.futureResult.get()
            #expect(answer.hasPrefix("HTTP/1.1 200"))
            #expect(answer.contains("Hello from fake Circuit"))
        }
    }
}
