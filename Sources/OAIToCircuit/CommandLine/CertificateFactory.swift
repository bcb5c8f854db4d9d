import Crypto
import Foundation
import SwiftASN1
import X509

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Makes a self-signed certificate and key for the bridge's HTTPS listener (`oai-to-circuit cert generate`).
///
/// Everything is done in-process with swift-certificates / swift-crypto; no `openssl` child process is involved.
public struct CertificateFactory: Sendable {
    /// PEM-encoded output of ``CertificateFactory/make()``.
    public struct Material: Sendable {
        /// The certificate as a `-----BEGIN CERTIFICATE-----` PEM block.
        public var certificatePEM: String
        /// The private key as a PKCS#8 `-----BEGIN PRIVATE KEY-----` PEM block.
        public var privateKeyPEM: String

        public init(certificatePEM: String, privateKeyPEM: String) {
            self.certificatePEM = certificatePEM
            self.privateKeyPEM = privateKeyPEM
        }
    }

    /// Organization (O) placed in both the subject and the issuer name.
    static let organization = "oai-to-circuit"
    /// How far `notValidBefore` is backdated, to tolerate small clock skew between machines.
    static let backdate: TimeInterval = 5 * 60
    /// Accepted range for `validityDays`.
    static let validityRange: ClosedRange<Int> = 1...36500
    /// Maximum length of a DNS name (RFC 1035, textual form without the root dot).
    static let maxHostnameLength = 253
    /// Upper bound for a commonName attribute (`ub-common-name` in RFC 5280).
    static let maxCommonNameLength = 64

    /// The name the certificate is issued for (a DNS name or an IPv4/IPv6 literal).
    public let hostname: String
    /// Number of days, counted from `now`, the certificate stays valid.
    public let validityDays: Int
    /// The reference time used for the validity window.
    public let now: Date

    /// Stores the parameters; they are validated by ``make()``.
    public init(hostname: String, validityDays: Int, now: Date = Date()) {
        self.hostname = hostname
        self.validityDays = validityDays
        self.now = now
    }

    /// Builds the certificate: ECDSA P-256 key, SHA-256 signature, subject/issuer CN=<hostname> and O=oai-to-circuit,
    /// serial random, notValidBefore = now - 5 minutes, notValidAfter = now + validityDays,
    /// extensions: basicConstraints CA:false (critical), keyUsage digitalSignature and keyCertSign (critical; strict verifiers such as BoringSSL check the self-signature against it when the certificate is its own trust anchor), extendedKeyUsage serverAuth,
    /// subjectAlternativeName with DNS names {hostname (if it is not an IP literal), "localhost"} and IP addresses
    /// {127.0.0.1, ::1, and hostname itself if it IS an IPv4/IPv6 literal} — IP SANs are encoded as iPAddress entries
    /// (4 or 16 raw bytes), never as DNS names; no duplicates.
    public func make() throws -> Material {
        try Self.validate(hostname: self.hostname)
        guard Self.validityRange.contains(self.validityDays) else {
            throw CertificateFactoryError.invalidValidity(self.validityDays)
        }

        let signingKey = P256.Signing.PrivateKey()
        let issuerKey = Certificate.PrivateKey(signingKey)

        // The commonName is informational only (clients match on the SAN); keep it within the RFC 5280 bound.
        let commonName = String(self.hostname.prefix(Self.maxCommonNameLength))
        let name = try DistinguishedName {
            CommonName(commonName)
            OrganizationName(Self.organization)
        }

        let extendedKeyUsage = try ExtendedKeyUsage([.serverAuth])
        let subjectAlternativeNames = SubjectAlternativeNames(Self.subjectAlternativeNames(for: self.hostname))
        let extensions = try Certificate.Extensions {
            Critical(BasicConstraints.notCertificateAuthority)
            Critical(KeyUsage(digitalSignature: true, keyCertSign: true))
            extendedKeyUsage
            subjectAlternativeNames
        }

        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: issuerKey.publicKey,
            notValidBefore: self.now.addingTimeInterval(-Self.backdate),
            notValidAfter: self.now.addingTimeInterval(TimeInterval(self.validityDays) * 86_400),
            issuer: name,
            subject: name,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: extensions,
            issuerPrivateKey: issuerKey
        )

        return Material(
            certificatePEM: Self.terminated(try certificate.serializeAsPEM().pemString),
            privateKeyPEM: Self.terminated(signingKey.pemRepresentation)
        )
    }

    /// Writes the PEM files. Refuses (throws `CertificateFactoryError.fileExists(path)`) if either file exists and
    /// `force` is false, checking BOTH before writing EITHER. Writes the key file with permissions 0600 and the cert
    /// with 0644. Creates parent directories if missing.
    ///
    /// Each file is first written to a temporary file next to its destination (created with its final mode, so the
    /// key is never readable by others) and then renamed into place.
    public static func write(_ material: Material, certificatePath: String, keyPath: String, force: Bool) throws {
        if PEMFileIO.standardized(certificatePath) == PEMFileIO.standardized(keyPath) {
            throw CertificateFileIOError(
                message: "certificate and key paths must be different (both are \(certificatePath))"
            )
        }
        if !force {
            for path in [certificatePath, keyPath] where PEMFileIO.exists(path) {
                throw CertificateFactoryError.fileExists(path)
            }
        }

        try PEMFileIO.createParentDirectory(of: keyPath)
        try PEMFileIO.createParentDirectory(of: certificatePath)

        let stagedKey = try PEMFileIO.stage(material.privateKeyPEM, beside: keyPath, mode: 0o600)
        let stagedCertificate: String
        do {
            stagedCertificate = try PEMFileIO.stage(material.certificatePEM, beside: certificatePath, mode: 0o644)
        } catch {
            PEMFileIO.remove(stagedKey)
            throw error
        }

        do {
            try PEMFileIO.move(stagedKey, to: keyPath)
        } catch {
            PEMFileIO.remove(stagedKey)
            PEMFileIO.remove(stagedCertificate)
            throw error
        }
        do {
            try PEMFileIO.move(stagedCertificate, to: certificatePath)
        } catch {
            PEMFileIO.remove(stagedCertificate)
            throw error
        }
    }

    // MARK: - Helpers

    /// PEM files conventionally end with a newline.
    static func terminated(_ pem: String) -> String {
        pem.hasSuffix("\n") ? pem : pem + "\n"
    }

    static func validate(hostname: String) throws {
        guard !hostname.isEmpty, hostname.utf8.count <= Self.maxHostnameLength else {
            throw CertificateFactoryError.invalidHostname(hostname)
        }
        // dNSName is an IA5String: printable ASCII only; whitespace is never valid in a host name.
        for byte in hostname.utf8 where byte <= 0x20 || byte >= 0x7F {
            throw CertificateFactoryError.invalidHostname(hostname)
        }
    }

    /// DNS names first (hostname, then localhost), then IP addresses (hostname if it is a literal, 127.0.0.1, ::1).
    static func subjectAlternativeNames(for hostname: String) -> [GeneralName] {
        var dnsNames: [String] = []
        var ipAddresses: [[UInt8]] = []

        func addDNSName(_ name: String) {
            if !dnsNames.contains(where: { $0.lowercased() == name.lowercased() }) {
                dnsNames.append(name)
            }
        }
        func addIPAddress(_ bytes: [UInt8]) {
            if !ipAddresses.contains(bytes) {
                ipAddresses.append(bytes)
            }
        }

        if let bytes = Self.ipAddressBytes(hostname) {
            addIPAddress(bytes)
        } else {
            addDNSName(hostname)
        }
        addDNSName("localhost")
        addIPAddress([127, 0, 0, 1])
        addIPAddress(Array(repeating: 0, count: 15) + [1])

        return dnsNames.map { GeneralName.dnsName($0) }
            + ipAddresses.map { GeneralName.ipAddress(ASN1OctetString(contentBytes: ArraySlice($0))) }
    }

    /// Returns the 4 (IPv4) or 16 (IPv6) network-order bytes if `text` is an IP literal, else nil.
    /// A bracketed IPv6 literal such as `[::1]` is accepted too.
    static func ipAddressBytes(_ text: String) -> [UInt8]? {
        var candidate = Substring(text)
        if candidate.hasPrefix("["), candidate.hasSuffix("]"), candidate.count > 2 {
            candidate = candidate.dropFirst().dropLast()
            return PEMFileIO.parseIPv6(String(candidate))
        }
        return PEMFileIO.parseIPv4(String(candidate)) ?? PEMFileIO.parseIPv6(String(candidate))
    }
}

public enum CertificateFactoryError: Error, CustomStringConvertible {
    case fileExists(String)
    case invalidHostname(String)
    case invalidValidity(Int)

    public var description: String {
        switch self {
        case .fileExists(let path):
            return "\(path) already exists; pass --force to overwrite it"
        case .invalidHostname(let hostname):
            return "invalid hostname \(Self.quoted(hostname)): it must be 1-253 printable ASCII characters with no whitespace"
        case .invalidValidity(let days):
            return "invalid validity of \(days) days: it must be between 1 and 36500"
        }
    }

    /// Quotes and escapes (newlines, tabs, ...) so the message stays on one line; long values are shortened.
    private static func quoted(_ value: String) -> String {
        let limit = 80
        let shown = value.count > limit ? String(value.prefix(limit)) + "..." : value
        return String(reflecting: shown)
    }
}

/// An I/O failure while writing the PEM files (not a user error covered by ``CertificateFactoryError``).
struct CertificateFileIOError: Error, CustomStringConvertible {
    let message: String

    init(message: String) {
        self.message = message
    }

    init(_ operation: String, _ path: String, errno code: Int32) {
        self.message = "could not \(operation) \(path): \(String(cString: strerror(code)))"
    }

    var description: String { self.message }
}

/// POSIX file helpers. Kept outside `CertificateFactory` so `write`/`open`/`rename` resolve to the C functions.
private enum PEMFileIO {
    static func standardized(_ path: String) -> String {
        URL(fileURLWithPath: path).standardizedFileURL.path
    }

    /// True if anything (including a dangling symlink or a directory) is at `path`.
    static func exists(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0
    }

    static func parentDirectory(of path: String) -> String {
        let parent = (path as NSString).deletingLastPathComponent
        return parent.isEmpty ? "." : parent
    }

    static func createParentDirectory(of path: String) throws {
        let parent = parentDirectory(of: path)
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: parent, isDirectory: &isDirectory), isDirectory.boolValue {
            return
        }
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
    }

    /// Writes `contents` to a new hidden temporary file in the destination's directory with exactly `mode`.
    static func stage(_ contents: String, beside destination: String, mode: mode_t) throws -> String {
        let name = (destination as NSString).lastPathComponent
        let temporary = parentDirectory(of: destination) + "/.\(name).tmp-\(UUID().uuidString)"

        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else {
            throw CertificateFileIOError("create", temporary, errno: errno)
        }
        do {
            // The umask may have cleared bits from `mode`; set it explicitly.
            guard fchmod(fd, mode) == 0 else {
                throw CertificateFileIOError("set permissions on", temporary, errno: errno)
            }
            let bytes = Array(contents.utf8)
            var offset = 0
            while offset < bytes.count {
                let written = bytes.withUnsafeBytes { buffer in
                    write(fd, buffer.baseAddress! + offset, buffer.count - offset)
                }
                if written < 0 {
                    if errno == EINTR { continue }
                    throw CertificateFileIOError("write", temporary, errno: errno)
                }
                offset += written
            }
            guard fsync(fd) == 0 else {
                throw CertificateFileIOError("flush", temporary, errno: errno)
            }
        } catch {
            close(fd)
            remove(temporary)
            throw error
        }
        guard close(fd) == 0 else {
            let code = errno
            remove(temporary)
            throw CertificateFileIOError("close", temporary, errno: code)
        }
        return temporary
    }

    static func move(_ source: String, to destination: String) throws {
        guard rename(source, destination) == 0 else {
            throw CertificateFileIOError("write", destination, errno: errno)
        }
    }

    static func remove(_ path: String) {
        _ = unlink(path)
    }

    static func parseIPv4(_ text: String) -> [UInt8]? {
        var address = in_addr()
        guard inet_pton(AF_INET, text, &address) == 1 else { return nil }
        return withUnsafeBytes(of: &address) { Array($0) }
    }

    static func parseIPv6(_ text: String) -> [UInt8]? {
        var address = in6_addr()
        guard inet_pton(AF_INET6, text, &address) == 1 else { return nil }
        return withUnsafeBytes(of: &address) { Array($0) }
    }
}
