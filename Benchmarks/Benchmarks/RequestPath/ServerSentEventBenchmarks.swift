import Benchmark
import NIOCore
import OAIToCircuit

/// Scanning Circuit's answers for usage: a whole stream through `ServerSentEventFilter` as the bridge relays it,
/// and `Usage.observe` over a JSON answer.
func serverSentEventBenchmarks() {
    let stream = Array(CircuitAnswers.stream.utf8)
    let pieces: [(name: String, buffers: [ByteBuffer])] = [
        ("one buffer per event", CircuitAnswers.events.map { ByteBuffer(string: $0) }),
        (
            "4 KB buffers",
            stride(from: 0, to: stream.count, by: 4096).map { ByteBuffer(bytes: stream[$0..<min($0 + 4096, stream.count)]) }
        ),
    ]
    for (name, buffers) in pieces {
        for hiding in [true, false] {
            // Measures the intended path only if the filter finds the usage chunk.
            precondition(relay(buffers, hiding: hiding).usage == CircuitAnswers.usage)
            Benchmark("ServerSentEventFilter, 100 events, \(name), \(hiding ? "hiding" : "passing") usage") { benchmark in
                benchmark.measure { blackHole(relay(buffers, hiding: hiding)) }
            }
        }
    }

    let answer = Array(CircuitAnswers.answer.utf8)
    precondition(answer.withUnsafeBufferPointer { Usage.observe($0)?.usage } == CircuitAnswers.usage)
    Benchmark("Usage.observe, JSON answer", configuration: .init(scalingFactor: .kilo)) { benchmark in
        answer.withUnsafeBufferPointer { bytes in
            benchmark.measure { blackHole(Usage.observe(bytes)) }
        }
    }
}

/// One stream through a new filter, as the bridge relays it, and its end.
private func relay(_ buffers: [ByteBuffer], hiding: Bool) -> ServerSentEventFilter {
    var filter = ServerSentEventFilter(hidesUsageChunk: hiding)
    for buffer in buffers { blackHole(filter.consume(buffer)) }
    blackHole(filter.finish())
    return filter
}

/// Circuit's answers as Azure OpenAI writes them: compact JSON, content filter results on every choice.
enum CircuitAnswers {
    static let usage = Usage(promptTokens: 245, completionTokens: 131, totalTokens: 376)

    static let filterResults =
        #"{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"#
        + #""sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}"#

    static let envelope =
        #""created":1764676245,"id":"chatcmpl-BbT3xq9dLw2vK8pR0mZ1yHn5cE7aF","model":"gpt-4o-2024-11-20","#
        + #""object":"chat.completion.chunk","system_fingerprint":"fp_ee1d74bde0""#

    static let usageJSON =
        #"{"completion_tokens":131,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"#
        + #""reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":245,"#
        + #""prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":376}"#

    /// The stream's events, each with its blank line: 100 chunks (prompt filter results, a role, 97 words, a finish
    /// reason), the usage-only chunk, and `[DONE]`.
    static let events: [String] = {
        func chunk(_ delta: String, finish: String = "null", filters: String = filterResults) -> String {
            #"data: {"choices":[{"content_filter_results":\#(filters),"delta":\#(delta),"finish_reason":\#(finish),"#
                + #""index":0,"logprobs":null}],\#(envelope),"usage":null}"# + "\n\n"
        }
        let words = "Check the keepalive and hold timers on both peers first: show ip bgp neighbors 10.20.0.1"
            .split(separator: " ")
        var events = [
            #"data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":"#
                + #"[{"prompt_index":0,"content_filter_results":\#(filterResults)}]}"# + "\n\n",
            chunk(#"{"content":"","refusal":null,"role":"assistant"}"#, filters: "{}"),
        ]
        for index in 0..<97 { events.append(chunk(#"{"content":" \#(words[index % words.count])"}"#)) }
        events.append(chunk("{}", finish: #""stop""#, filters: "{}"))
        events.append(#"data: {"choices":[],\#(envelope),"usage":\#(usageJSON)}"# + "\n\n")
        events.append("data: [DONE]\n\n")
        return events
    }()

    static let stream = events.joined()

    /// A non-streamed answer.
    static let answer =
        #"{"choices":[{"content_filter_results":\#(filterResults),"finish_reason":"stop","index":0,"logprobs":null,"#
        + #""message":{"annotations":[],"content":"Check the keepalive and hold timers on both peers first. With "#
        + #"timers 10 30 on the branch and the hub's defaults (60 180), the session negotiates the lower hold time, "#
        + #"30 seconds, so three lost keepalives drop it.\n\n1. show ip bgp neighbors 10.20.0.1 | include hold|keepalive\n"#
        + #"2. show policy-map interface GigabitEthernet0/0/0 (are keepalives queued behind bulk traffic?)\n"#
        + #"3. show interfaces GigabitEthernet0/0/0 | include drops\n\nIf drops rise with the flaps, give BGP's "#
        + #"packets priority (CS6) in the WAN policy.","refusal":null,"role":"assistant"}}],"#
        + #""created":1764676245,"id":"chatcmpl-BbT3xq9dLw2vK8pR0mZ1yHn5cE7aF","model":"gpt-4o-2024-11-20","#
        + #""object":"chat.completion","prompt_filter_results":[{"prompt_index":0,"content_filter_results":"#
        + #"\#(filterResults)}],"system_fingerprint":"fp_ee1d74bde0","usage":\#(usageJSON)}"#
}
