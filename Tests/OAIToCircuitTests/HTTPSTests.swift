import Foundation
import Testing

@testable import OAIToCircuit

/// HTTP and HTTPS in one process, with a certificate from `cert generate`.
@Suite(.timeLimit(.minutes(1))) struct HTTPSTests {
    static func certificate() throws -> (directory: URL, cert: String, key: String) {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("oai-https-\(UUID().uuidString)")
        let cert = directory.appendingPathComponent("cert.pem").path
        let key = directory.appendingPathComponent("key.pem").path
        let material = try CertificateFactory(hostname: "bridge.test", validityDays: 2).make()
        try CertificateFactory.write(material, certificatePath: cert, keyPath: key, force: false)
        return (directory, cert, key)
    }

    static func listener(_ mode: BridgeConfiguration.TLSMode, cert: String, key: String) -> BridgeConfiguration.Listener {
        var listener = BridgeConfiguration.Listener()
        listener.host = "127.0.0.1"
        listener.port = 0
        listener.sslPort = 0
        listener.tls = mode
        listener.certificatePath = cert
        listener.privateKeyPath = key
        return listener
    }

    @Test func sslServesHTTPAndHTTPS() async throws {
        let files = try Self.certificate()
        defer { try? FileManager.default.removeItem(at: files.directory) }
        try await Harness.with(listener: Self.listener(.both, cert: files.cert, key: files.key), trusting: files.cert) {
            harness async throws in
            #expect(harness.httpPort != nil && harness.httpsPort != nil)
            // Full verification: the certificate must name 127.0.0.1 as an IP address.
            let secure = try await harness.request(.POST, "/v1/chat/completions", body: Harness.chatBody(), https: true)
            #expect(secure.status == 200)
            #expect(try await harness.chat(Harness.chatBody()).status == 200)
        }
    }

    @Test func sslOnlyServesHTTPSOnly() async throws {
        let files = try Self.certificate()
        defer { try? FileManager.default.removeItem(at: files.directory) }
        try await Harness.with(listener: Self.listener(.only, cert: files.cert, key: files.key), trusting: files.cert) {
            harness async throws in
            #expect(harness.httpPort == nil && harness.httpsPort != nil)
            let answer = try await harness.request(.GET, "/health", subkey: nil, https: true)
            #expect(answer.json?["status"] as? String == "healthy")
        }
    }

    @Test func missingCertificateNamesTheFileAndHowToMakeOne() async throws {
        #expect {
            try BridgeServer.tlsConfiguration(certificate: "/nonexistent/cert.pem", privateKey: "/nonexistent/key.pem")
        } throws: { error in
            let error = error as? ConfigurationError
            return error?.name == "--cert" && error?.problem.contains("/nonexistent/cert.pem") == true
                && error?.problem.contains("oai-to-circuit cert generate") == true
        }
    }

    @Test func garbageCertificateIsAConfigurationError() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("oai-bad-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let cert = directory.appendingPathComponent("cert.pem").path
        try Data("not a certificate".utf8).write(to: URL(fileURLWithPath: cert))
        #expect(throws: ConfigurationError.self) {
            try BridgeServer.tlsConfiguration(certificate: cert, privateKey: cert)
        }
    }
}
