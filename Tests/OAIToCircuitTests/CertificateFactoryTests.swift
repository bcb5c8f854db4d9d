import Foundation
import Testing
import X509

@testable import OAIToCircuit

@Suite("CertificateFactory")
struct CertificateFactoryTests {
    /// A whole-second reference time, so the encoded validity dates compare exactly.
    static let now = Date(timeIntervalSince1970: 1_750_000_000)
    static let loopbackV4: [UInt8] = [127, 0, 0, 1]
    static let loopbackV6: [UInt8] = Array(repeating: 0, count: 15) + [1]

    // MARK: helpers

    private func makeCertificate(
        hostname: String,
        validityDays: Int = 30
    ) throws -> (Certificate, CertificateFactory.Material) {
        let material = try CertificateFactory(hostname: hostname, validityDays: validityDays, now: Self.now).make()
        let certificate = try Certificate(pemEncoded: material.certificatePEM)
        return (certificate, material)
    }

    private func sans(_ certificate: Certificate) throws -> [GeneralName] {
        let san = try #require(try certificate.extensions.subjectAlternativeNames)
        return Array(san)
    }

    private func dnsNames(_ names: [GeneralName]) -> [String] {
        names.compactMap { if case .dnsName(let name) = $0 { name } else { nil } }
    }

    private func ipAddresses(_ names: [GeneralName]) -> [[UInt8]] {
        names.compactMap { if case .ipAddress(let octets) = $0 { Array(octets.bytes) } else { nil } }
    }

    private func withTemporaryDirectory(_ body: (URL) throws -> Void) throws {
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("CertificateFactoryTests-\(UUID().uuidString)", isDirectory: true)
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        try body(directory)
    }

    private func permissions(_ path: String) throws -> Int {
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        let value = try #require(attributes[.posixPermissions] as? NSNumber)
        return value.intValue & 0o777
    }

    private func contents(_ path: String) throws -> String {
        try String(contentsOfFile: path, encoding: .utf8)
    }

    // MARK: certificate contents

    @Test func subjectAlternativeNamesForDNSHostname() throws {
        let (certificate, _) = try makeCertificate(hostname: "myhost.example")
        let names = try sans(certificate)

        #expect(names.contains(.dnsName("myhost.example")))
        #expect(names.contains(.dnsName("localhost")))
        #expect(ipAddresses(names).contains(Self.loopbackV4))
        #expect(ipAddresses(names).contains(Self.loopbackV6))
        #expect(ipAddresses(names).allSatisfy { $0.count == 4 || $0.count == 16 })
        #expect(!dnsNames(names).contains("127.0.0.1"))
        #expect(!dnsNames(names).contains("::1"))
        #expect(Set(names).count == names.count, "duplicate SAN entries: \(names)")
        #expect(names.count == 4)
    }

    @Test func ipv4HostnameBecomesIPAddressSAN() throws {
        let (certificate, _) = try makeCertificate(hostname: "10.1.2.3")
        let names = try sans(certificate)

        #expect(ipAddresses(names).contains([10, 1, 2, 3]))
        #expect(ipAddresses(names).contains(Self.loopbackV4))
        #expect(ipAddresses(names).contains(Self.loopbackV6))
        #expect(dnsNames(names) == ["localhost"])
        #expect(Set(names).count == names.count)
    }

    @Test func ipv6HostnameBecomesIPAddressSAN() throws {
        let (certificate, _) = try makeCertificate(hostname: "fd00::1:2")
        let names = try sans(certificate)

        let expected: [UInt8] = [0xFD, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2]
        #expect(ipAddresses(names).contains(expected))
        #expect(dnsNames(names) == ["localhost"])
    }

    @Test(arguments: ["127.0.0.1", "::1", "0:0:0:0:0:0:0:1", "[::1]", "localhost", "LOCALHOST"])
    func loopbackHostnamesDoNotDuplicate(hostname: String) throws {
        let (certificate, _) = try makeCertificate(hostname: hostname)
        let names = try sans(certificate)

        #expect(names.count == 3, "unexpected SAN entries: \(names)")
        #expect(ipAddresses(names).contains(Self.loopbackV4))
        #expect(ipAddresses(names).contains(Self.loopbackV6))
        #expect(dnsNames(names).map { $0.lowercased() } == ["localhost"])
    }

    @Test func subjectIssuerAndValidity() throws {
        let (certificate, _) = try makeCertificate(hostname: "myhost.example", validityDays: 90)
        let expectedName = try DistinguishedName {
            CommonName("myhost.example")
            OrganizationName("oai-to-circuit")
        }

        #expect(certificate.subject == expectedName)
        #expect(certificate.issuer == expectedName)
        #expect(certificate.version == .v3)
        #expect(certificate.notValidBefore == Self.now.addingTimeInterval(-5 * 60))
        #expect(certificate.notValidAfter == Self.now.addingTimeInterval(90 * 86_400))
        #expect(certificate.signatureAlgorithm == .ecdsaWithSHA256)
    }

    @Test func extensions() throws {
        let (certificate, _) = try makeCertificate(hostname: "myhost.example")
        let extensions = certificate.extensions

        #expect(try extensions.basicConstraints == .notCertificateAuthority)
        #expect(extensions[oid: .X509ExtensionID.basicConstraints]?.critical == true)

        let keyUsage = try #require(try extensions.keyUsage)
        #expect(keyUsage.digitalSignature)
        #expect(keyUsage.keyCertSign)  // lets BoringSSL verify the self-signature when the certificate is the trust anchor
        #expect(extensions[oid: .X509ExtensionID.keyUsage]?.critical == true)

        let extendedKeyUsage = try #require(try extensions.extendedKeyUsage)
        #expect(extendedKeyUsage.contains(.serverAuth))
        #expect(extensions[oid: .X509ExtensionID.subjectAlternativeName]?.critical == false)
    }

    @Test func signatureVerifiesWithOwnKey() throws {
        let (certificate, _) = try makeCertificate(hostname: "myhost.example")
        #expect(certificate.publicKey.isValidSignature(certificate.signature, for: certificate))
    }

    @Test func privateKeyIsPKCS8AndMatchesCertificate() throws {
        let (certificate, material) = try makeCertificate(hostname: "myhost.example")

        #expect(material.privateKeyPEM.hasPrefix("-----BEGIN PRIVATE KEY-----"))
        #expect(material.privateKeyPEM.hasSuffix("-----END PRIVATE KEY-----\n"))
        #expect(material.certificatePEM.hasPrefix("-----BEGIN CERTIFICATE-----"))
        let key = try Certificate.PrivateKey(pemEncoded: material.privateKeyPEM)
        #expect(key.publicKey == certificate.publicKey)
    }

    @Test func serialNumbersAreRandom() throws {
        let (first, _) = try makeCertificate(hostname: "myhost.example")
        let (second, _) = try makeCertificate(hostname: "myhost.example")
        #expect(first.serialNumber != second.serialNumber)
    }

    // MARK: validation

    @Test(arguments: ["", "my host", "host\n", "\thost", String(repeating: "a", count: 254)])
    func rejectsInvalidHostname(hostname: String) throws {
        let error = #expect(throws: CertificateFactoryError.self) {
            try CertificateFactory(hostname: hostname, validityDays: 30).make()
        }
        guard case .invalidHostname(let reported)? = error else {
            Issue.record("expected invalidHostname, got \(String(describing: error))")
            return
        }
        #expect(reported == hostname)
        #expect(!(error?.description.contains("\n") ?? true))
    }

    @Test func acceptsLongestHostname() throws {
        let hostname = String(repeating: "a", count: 253)
        let (certificate, _) = try makeCertificate(hostname: hostname)
        #expect(try sans(certificate).contains(.dnsName(hostname)))
    }

    @Test(arguments: [0, -1, 36501])
    func rejectsInvalidValidity(days: Int) throws {
        let error = #expect(throws: CertificateFactoryError.self) {
            try CertificateFactory(hostname: "myhost.example", validityDays: days).make()
        }
        guard case .invalidValidity(let reported)? = error else {
            Issue.record("expected invalidValidity, got \(String(describing: error))")
            return
        }
        #expect(reported == days)
    }

    @Test(arguments: [1, 36500])
    func acceptsValidityBounds(days: Int) throws {
        let (certificate, _) = try makeCertificate(hostname: "myhost.example", validityDays: days)
        #expect(certificate.notValidAfter == Self.now.addingTimeInterval(Double(days) * 86_400))
    }

    @Test func errorDescriptions() {
        #expect(
            CertificateFactoryError.fileExists("cert.pem").description
                == "cert.pem already exists; pass --force to overwrite it"
        )
        #expect(CertificateFactoryError.invalidValidity(0).description.contains("36500"))
        #expect(CertificateFactoryError.invalidHostname("a b").description.contains("a b"))
    }

    // MARK: writing

    @Test func writeCreatesDirectoriesAndSetsModes() throws {
        try withTemporaryDirectory { directory in
            let material = try CertificateFactory(hostname: "myhost.example", validityDays: 30).make()
            let certificatePath = directory.appendingPathComponent("nested/dir/cert.pem").path
            let keyPath = directory.appendingPathComponent("other/key.pem").path

            try CertificateFactory.write(material, certificatePath: certificatePath, keyPath: keyPath, force: false)

            #expect(try contents(certificatePath) == material.certificatePEM)
            #expect(try contents(keyPath) == material.privateKeyPEM)
            #expect(try permissions(keyPath) == 0o600)
            #expect(try permissions(certificatePath) == 0o644)
            _ = try Certificate(pemEncoded: try contents(certificatePath))

            // No temporary files are left behind.
            let leftovers = try FileManager.default.contentsOfDirectory(
                atPath: directory.appendingPathComponent("other").path
            )
            #expect(leftovers == ["key.pem"])
        }
    }

    @Test func writeRefusesToOverwriteWithoutForce() throws {
        try withTemporaryDirectory { directory in
            let certificatePath = directory.appendingPathComponent("cert.pem").path
            let keyPath = directory.appendingPathComponent("key.pem").path
            let original = try CertificateFactory(hostname: "first.example", validityDays: 30).make()
            let replacement = try CertificateFactory(hostname: "second.example", validityDays: 30).make()

            try CertificateFactory.write(original, certificatePath: certificatePath, keyPath: keyPath, force: false)

            let error = #expect(throws: CertificateFactoryError.self) {
                try CertificateFactory.write(
                    replacement,
                    certificatePath: certificatePath,
                    keyPath: keyPath,
                    force: false
                )
            }
            guard case .fileExists(let path)? = error else {
                Issue.record("expected fileExists, got \(String(describing: error))")
                return
            }
            #expect(path == certificatePath)
            #expect(try contents(certificatePath) == original.certificatePEM)
            #expect(try contents(keyPath) == original.privateKeyPEM)

            try CertificateFactory.write(replacement, certificatePath: certificatePath, keyPath: keyPath, force: true)
            #expect(try contents(certificatePath) == replacement.certificatePEM)
            #expect(try contents(keyPath) == replacement.privateKeyPEM)
            #expect(try permissions(keyPath) == 0o600)
            #expect(try permissions(certificatePath) == 0o644)
        }
    }

    @Test func writeChecksBothFilesBeforeWritingEither() throws {
        try withTemporaryDirectory { directory in
            let certificatePath = directory.appendingPathComponent("cert.pem").path
            let keyPath = directory.appendingPathComponent("key.pem").path
            try "existing key\n".write(toFile: keyPath, atomically: false, encoding: .utf8)
            let material = try CertificateFactory(hostname: "myhost.example", validityDays: 30).make()

            let error = #expect(throws: CertificateFactoryError.self) {
                try CertificateFactory.write(material, certificatePath: certificatePath, keyPath: keyPath, force: false)
            }
            guard case .fileExists(let path)? = error else {
                Issue.record("expected fileExists, got \(String(describing: error))")
                return
            }
            #expect(path == keyPath)
            #expect(!FileManager.default.fileExists(atPath: certificatePath))
            #expect(try contents(keyPath) == "existing key\n")
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path) == ["key.pem"])
        }
    }

    @Test func forcedOverwriteTightensKeyPermissions() throws {
        try withTemporaryDirectory { directory in
            let certificatePath = directory.appendingPathComponent("cert.pem").path
            let keyPath = directory.appendingPathComponent("key.pem").path
            try "old key\n".write(toFile: keyPath, atomically: false, encoding: .utf8)
            try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: keyPath)
            let material = try CertificateFactory(hostname: "myhost.example", validityDays: 30).make()

            try CertificateFactory.write(material, certificatePath: certificatePath, keyPath: keyPath, force: true)

            #expect(try contents(keyPath) == material.privateKeyPEM)
            #expect(try permissions(keyPath) == 0o600)
        }
    }
}
