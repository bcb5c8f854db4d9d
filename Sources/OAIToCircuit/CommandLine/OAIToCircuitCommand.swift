import ArgumentParser
import Foundation
import Logging

/// `oai-to-circuit`: the bridge's command line. `serve` is the default subcommand.
public struct OAIToCircuitCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "oai-to-circuit",
        abstract: "An OpenAI-compatible gateway to Cisco's Circuit API.",
        version: BridgeVersion.current,
        subcommands: [
            ServeCommand.self, CertCommand.self, QuotasCommand.self, UsageCommand.self, KeysCommand.self, HECCommand.self,
        ],
        defaultSubcommand: ServeCommand.self
    )

    public init() {}
}

/// Exit status for invalid configuration (sysexits' EX_CONFIG).
let configurationExitCode = ExitCode(78)

/// A message for the operator on standard error; under journald at error priority, so `journalctl -p err` shows
/// why a start failed.
func printError(_ message: String) {
    let prefix = LineLogHandler.standardErrorIsJournal ? "<3>" : ""
    FileHandle.standardError.write(Data((prefix + message + "\n").utf8))
}

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the bridge (the default)."
    )

    @Option(help: "Bind address.") var host = "0.0.0.0"
    @Option(help: "HTTP port.") var port = "12000"
    @Option(name: .customLong("ssl-port"), help: "HTTPS port.") var sslPort = "12443"
    @Flag(help: "Serve HTTP and HTTPS.") var ssl = false
    @Flag(name: .customLong("ssl-only"), help: "Serve HTTPS only.") var sslOnly = false
    @Option(help: "PEM certificate.") var cert = "cert.pem"
    @Option(help: "PEM private key.") var key = "key.pem"
    @Option(name: .customLong("env-file"), help: "Read KEY=VALUE lines; variables already set win.") var envFile: String?
    @Flag(name: .customLong("no-reload"), help: .hidden) var noReload = false

    func run() async throws {
        let bridgeConfiguration: BridgeConfiguration
        do {
            bridgeConfiguration = try makeConfiguration(processEnvironment: ProcessInfo.processInfo.environment)
        } catch let error as ConfigurationError {
            printError(error.description)
            throw configurationExitCode
        }
        var logger = Logger(label: "oai-to-circuit", factory: { LineLogHandler(label: $0) })
        logger.logLevel = bridgeConfiguration.logLevel
        do {
            try await BridgeServer.run(configuration: bridgeConfiguration, logger: logger)
        } catch let error as ConfigurationError {
            printError(error.description)
            throw configurationExitCode
        } catch {
            logger.critical("could not start", metadata: ["error": "\(error)"])
            throw ExitCode.failure
        }
    }

    func makeConfiguration(processEnvironment: [String: String]) throws -> BridgeConfiguration {
        let environment = try EnvironmentFile.merged(into: processEnvironment, from: envFile)
        var listener = BridgeConfiguration.Listener()
        listener.host = host
        listener.port = try Self.port(port, flag: "--port")
        listener.sslPort = try Self.port(sslPort, flag: "--ssl-port")
        listener.tls = sslOnly ? .only : (ssl ? .both : .off)
        listener.certificatePath = cert
        listener.privateKeyPath = key
        if listener.tls == .both, listener.port == listener.sslPort, listener.port != 0 {
            throw ConfigurationError("--ssl-port", "must differ from --port")
        }
        return try BridgeConfiguration(environment: environment, listener: listener)
    }

    static func port(_ text: String, flag: String) throws -> Int {
        guard let port = Int(text), (0...65535).contains(port) else {
            throw ConfigurationError(flag, "must be a port number from 0 to 65535, got '\(text)'")
        }
        return port
    }
}

struct CertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cert",
        abstract: "Manage the HTTPS certificate.",
        subcommands: [Generate.self]
    )

    struct Generate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a self-signed certificate for the HTTPS listener."
        )

        @Option(help: "Host name the certificate is for (localhost, 127.0.0.1 and ::1 are always included).")
        var hostname = "localhost"
        @Option(help: "Certificate file to write.") var cert = "cert.pem"
        @Option(help: "Private key file to write (mode 0600).") var key = "key.pem"
        @Option(help: "Days the certificate is valid.") var days = 365
        @Flag(help: "Overwrite existing files.") var force = false

        func run() throws {
            do {
                let material = try CertificateFactory(hostname: hostname, validityDays: days).make()
                try CertificateFactory.write(material, certificatePath: cert, keyPath: key, force: force)
            } catch let error as CertificateFactoryError {
                printError("error: \(error)")
                throw ExitCode.failure
            }
            print("Wrote \(cert) and \(key) for \(hostname), valid \(days) days.")
            print("Serve HTTPS with: oai-to-circuit serve --ssl --cert \(cert) --key \(key)")
        }
    }
}
