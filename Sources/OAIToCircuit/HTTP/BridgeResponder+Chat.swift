import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import Synchronization

/// `POST /v1/chat/completions`, in the contract's order: subkey, body, policy, rewrite, token, forward, answer,
/// account.
extension BridgeResponder {
    /// A non-streamed answer is read whole before it is sent, so its usage can be committed first; this bounds it.
    static let maximumAnswerBytes = 64 << 20

    func chat(_ request: Request, context: Context, exchange: inout Exchange) async throws -> Response {
        let caller = try await authorize(request, exchange: &exchange)
        // Awaited only once the caller is known: a refused client's body is dropped once its refusal is written.
        let chat = try ChatRequest.parse(try await context.body.collect(), appKey: bridge.configuration.appKey)
        exchange.model = chat.model
        let admission = try await bridge.policy.admit(caller, model: chat.model)

        let sent = ContinuousClock.now
        let upstream: UpstreamResponse
        do {
            upstream = try await bridge.circuit.send(
                model: chat.model,
                body: chat.upstreamBody,
                collectLimit: Self.maximumAnswerBytes,
                logger: bridge.logger
            )
        } catch {
            await bridge.policy.release(admission)
            throw error
        }
        bridge.metrics.upstreamResponded(model: chat.model, after: ContinuousClock.now - sent)

        var headers: HTTPFields = [:]
        for header in upstream.headers {
            let name = header.name.lowercased()
            if name == "content-type" || name.hasPrefix("x-ratelimit-"), let field = HTTPField.Name(header.name) {
                headers.append(HTTPField(name: field, value: header.value))
            }
        }
        let status = HTTPResponse.Status(code: Int(upstream.status.code))
        let accounting = Accounting(
            bridge: bridge,
            exchange: exchange,
            admission: admission,
            isStreaming: chat.isStreaming,
            status: status
        )

        let answer: ByteBuffer
        switch upstream.body {
        case .complete(let body):
            answer = body
        case .broken(let error):
            // Circuit answered, so the request counts; the client gets the transport failure.
            await accounting.commit(usage: .zero, clientDisconnected: false)
            throw CircuitClient.classify(error, logger: bridge.logger)
        case .stream(let stream):
            exchange.logsWhenStreamEnds = true
            // Proxies between the bridge and the client must not cache or buffer the stream.
            headers[.cacheControl] = "no-cache"
            headers[HTTPField.Name("X-Accel-Buffering")!] = "no"
            var ending = exchange
            ending.logsWhenStreamEnds = false
            let responder = self
            let finish: @Sendable () -> Void = { [ending] in responder.finish(ending, status: Int(status.code))() }
            let unstarted = UnstartedStream(accounting: accounting, upstream: stream, finish: finish)
            let hidesUsageChunk = !chat.clientWantsUsage
            let client = context.channel
            return Response(
                status: status,
                headers: headers,
                body: ResponseBody { writer in
                    unstarted.start()
                    let outcome = await accounting.relay(
                        stream,
                        hidingUsageChunk: hidesUsageChunk,
                        watching: client,
                        to: &writer
                    )
                    finish()
                    if outcome.clientDisconnected { throw CancellationError() }
                }
            )
        }
        let usage = answer.withUnsafeReadableBytes { Usage.observe($0.assumingMemoryBound(to: UInt8.self))?.usage }
        await accounting.commit(usage: usage ?? .zero, clientDisconnected: false)
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: answer))
    }
}

/// The bookkeeping of one answered chat: relays a stream while reading its usage, and commits the usage record
/// before the answer's last byte.
struct Accounting: Sendable {
    let bridge: Bridge
    let exchange: Exchange
    let admission: Admission
    let isStreaming: Bool
    let status: HTTPResponse.Status

    struct Outcome {
        var clientDisconnected = false
    }

    func commit(usage: Usage, clientDisconnected: Bool) async {
        bridge.metrics.tokensUsed(model: admission.model, usage: usage)
        await bridge.recorder.record(
            UsageRecord(
                requestID: exchange.requestID,
                finishedAt: bridge.clock.now(),
                admission: admission,
                statusCode: Int(status.code),
                usage: usage,
                isStreaming: isStreaming,
                latency: ContinuousClock.now - exchange.started,
                clientDisconnected: clientDisconnected,
                clientAddress: exchange.clientAddress,
                forwardedFor: exchange.forwardedFor
            )
        )
    }

    /// Passes Circuit's event stream to the client as it arrives. Stops reading Circuit (which closes its
    /// connection) when the client goes away, also while Circuit is silent; turns a failure of Circuit mid-stream
    /// into a final SSE error event.
    func relay(
        _ upstream: UpstreamBody,
        hidingUsageChunk: Bool,
        watching client: any Channel,
        to writer: inout any ResponseBodyWriter
    ) async -> Outcome {
        var filter = ServerSentEventFilter(hidesUsageChunk: hidingUsageChunk)
        var outcome = Outcome()
        var failure: BridgeError?
        // A client that leaves interrupts a wait for Circuit's next chunk: the wait ends with `.cancelled`.
        let hangUp = await ClientHangUpHandler.of(client)
        hangUp?.watch { upstream.cancel() }
        defer { hangUp?.unwatch() }
        var chunks = upstream.makeAsyncIterator()
        while true {
            let chunk: ByteBuffer?
            do {
                chunk = try await chunks.next()
            } catch {
                if hangUp?.hasHungUp == true || !client.isActive {
                    outcome.clientDisconnected = true
                } else {
                    failure = CircuitClient.classify(error, logger: bridge.logger)
                }
                break
            }
            guard let chunk else { break }
            guard let out = filter.consume(chunk) else { continue }
            do {
                try await writer.write(out)
            } catch {
                outcome.clientDisconnected = true
                upstream.cancel()
                break
            }
        }
        var tail: ByteBuffer?
        if !outcome.clientDisconnected {
            if let failure {
                // Whatever Circuit left unfinished is dropped, so the error event stands alone and parses.
                var event = Self.errorEvent(failure)
                if var abandoned = filter.abandon() {
                    abandoned.writeBuffer(&event)
                    tail = abandoned
                } else {
                    tail = event
                }
            } else {
                tail = filter.finish()
            }
        }
        await commit(usage: filter.usage ?? .zero, clientDisconnected: outcome.clientDisconnected)
        if outcome.clientDisconnected {
            bridge.logger.info("client disconnected mid-stream", metadata: ["request_id": "\(exchange.requestID)"])
            return outcome
        }
        do {
            if let tail { try await writer.write(tail) }
            try await writer.finish(nil)
        } catch {
            outcome.clientDisconnected = true
        }
        return outcome
    }

    /// `data: {"error": …}`: the OpenAI SDKs raise it as an API error.
    static func errorEvent(_ error: BridgeError) -> ByteBuffer {
        var event = ByteBuffer(string: "data: ")
        event.writeBytes(error.body)
        event.writeString("\n\n")
        return event
    }
}

/// Accounts a streamed answer whose body never ran. The bridge's server runs every body, even for a client that has
/// gone; this guard keeps the request counted should a response ever be dropped unwritten (a server that fails to
/// write the head may drop the body), since Circuit answered all the same.
final class UnstartedStream: Sendable {
    private let started = Atomic<Bool>(false)
    private let accounting: Accounting
    private let upstream: UpstreamBody
    private let finish: @Sendable () -> Void

    init(accounting: Accounting, upstream: UpstreamBody, finish: @escaping @Sendable () -> Void) {
        self.accounting = accounting
        self.upstream = upstream
        self.finish = finish
    }

    func start() { started.store(true, ordering: .relaxed) }

    deinit {
        guard !started.load(ordering: .relaxed) else { return }
        // Nobody will read the rest of Circuit's answer: its connection goes rather than wait, paused, for ever.
        upstream.cancel()
        let accounting = self.accounting
        let finish = self.finish
        // A deinit cannot await; this task is the only way left to record the request.
        Task {
            await accounting.commit(usage: .zero, clientDisconnected: true)
            finish()
        }
    }
}
