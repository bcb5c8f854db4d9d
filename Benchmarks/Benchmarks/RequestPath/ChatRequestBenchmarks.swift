import Benchmark
import NIOCore
import OAIToCircuit

/// Rewriting a client's chat body into Circuit's (`ChatRequest.parse`): validation, `model` dropped, `user` and
/// `stream_options` set, every other member copied.
func chatRequestBenchmarks() {
    let appKey = "circuit-app-key-7f3c9a"
    let bodies: [(name: String, body: String, scaling: BenchmarkScalingFactor)] = [
        ("typical 1 KB", ChatBodies.typical, .kilo),
        ("user object, stream_options", ChatBodies.streamingWithUser, .kilo),
        ("256 KB conversation", ChatBodies.longConversation, .one),
    ]
    for (name, text, scaling) in bodies {
        let body = ByteBuffer(string: text)
        Benchmark("ChatRequest.parse, \(name)", configuration: .init(scalingFactor: scaling)) { benchmark in
            try benchmark.measure { blackHole(try ChatRequest.parse(body, appKey: appKey)) }
        }
    }
}

/// Chat bodies as OpenAI's Python SDK sends them (`json.dumps`: ", " and ": " between members).
enum ChatBodies {
    static let system = message(
        "system",
        "You are a network assistant for Cisco engineers. Answer in English, be concise, and cite the IOS XE "
            + "commands you rely on. If you are not sure, say so instead of guessing."
    )

    static let question = message(
        "user",
        """
        Our branch router drops BGP sessions to the "hub-east" peer every few hours. Here is the relevant part of \
        the configuration:
        router bgp 65010
         neighbor 10.20.0.1 remote-as 65000
         neighbor 10.20.0.1 timers 10 30
         neighbor 10.20.0.1 update-source Loopback0
        The logs show "BGP-5-ADJCHANGE: neighbor 10.20.0.1 Down BGP Notification sent" followed by "hold time \
        expired". The WAN link itself stays up and ping to the peer works the whole time. What should I check \
        first, and which show commands will tell me whether the keepalives are being lost or delayed?
        """
    )

    /// About 1 KB: a system and a user message, a temperature, no `user`.
    static let typical = #"{"model": "gpt-4o", "messages": [\#(system), \#(question)], "temperature": 0.2, "max_tokens": 800}"#

    /// About 1 KB, streamed: `user` holds a JSON object (the appkey is added to it) and `stream_options` does not ask
    /// for usage (the bridge asks for it).
    static let streamingWithUser = """
        {"model": "gpt-4o", "messages": [\(system), \(question)], "temperature": 0.2, \
        "user": "{\\"session_id\\": \\"3f2a9c1e-8b7d-4e6f-a5c4-1d2e3f4a5b6c\\", \\"user\\": \\"alice@example.com\\"}", \
        "stream": true, "stream_options": {"include_usage": false}}
        """

    /// About 256 KB: a long conversation, alternating questions and answers of 2 KB.
    static let longConversation: String = {
        var messages = [system]
        var size = 0
        while size < 256 * 1024 {
            let turn = messages.count
            let text = String(repeating: "Turn \(turn): the \"hub-east\" peer flapped again at 10:4\(turn % 10).\n", count: 32)
            messages.append(message(turn % 2 == 1 ? "user" : "assistant", text))
            size += messages.last!.utf8.count
        }
        return #"{"model": "gpt-4o", "messages": [\#(messages.joined(separator: ", "))], "temperature": 0.2}"#
    }()

    static func message(_ role: String, _ content: String) -> String {
        #"{"role": "\#(role)", "content": \#(jsonString(content))}"#
    }

    /// `text` as a JSON string (these fixtures hold quotes and newlines, nothing rarer).
    static func jsonString(_ text: String) -> String {
        var out = "\""
        for character in text {
            switch character {
            case "\"": out += #"\""#
            case "\\": out += #"\\"#
            case "\n": out += #"\n"#
            default: out.append(character)
            }
        }
        return out + "\""
    }
}
