import OAIToCircuit

@main
struct Entry {
    static func main() async {
        await OAIToCircuitCommand.main()
    }
}
