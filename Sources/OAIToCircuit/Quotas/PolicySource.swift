import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where the quota policy comes from: `QUOTAS_JSON` inline (it wins), else the file at `QUOTAS_JSON_PATH`.
public enum PolicySource: Sendable, CustomStringConvertible {
    case inline(String)
    case file(String)

    public init(_ configuration: BridgeConfiguration) {
        if let inline = configuration.quotasJSON {
            self = .inline(inline)
        } else {
            self = .file(configuration.quotasJSONPath)
        }
    }

    /// The variable a bad policy is reported against (contract: exit 78 names the variable).
    public var variable: String {
        switch self {
        case .inline: "QUOTAS_JSON"
        case .file: "QUOTAS_JSON_PATH"
        }
    }

    public var description: String {
        switch self {
        case .inline: "QUOTAS_JSON"
        case .file(let path): path
        }
    }

    /// A policy file is never this large; refusing early keeps a wrong path (a log file, a device) harmless.
    static let maximumFileBytes = 16 << 20

    /// Reads and validates the policy. A missing file is an empty policy: no subkey is authorised by it (the key
    /// registry and anonymous access may still be), and the file is picked up when it appears.
    public func load() throws(PolicyError) -> QuotaPolicy {
        switch self {
        case .inline(let text):
            return try QuotaPolicy.parse(Array(text.utf8), source: "QUOTAS_JSON")
        case .file(let path):
            guard FileManager.default.fileExists(atPath: path) else { return .empty }
            guard let stamp = FileStamp(path: path), stamp.size <= Self.maximumFileBytes else {
                throw PolicyError("\(path): larger than \(Self.maximumFileBytes >> 20) MiB, not a policy file")
            }
            guard let data = FileManager.default.contents(atPath: path) else {
                throw PolicyError("\(path): cannot be read (check its permissions)")
            }
            return try QuotaPolicy.parse(Array(data), source: path)
        }
    }

    /// Whether the policy file exists (always true for an inline policy).
    public var exists: Bool {
        switch self {
        case .inline: true
        case .file(let path): FileManager.default.fileExists(atPath: path)
        }
    }

    /// What the file looks like now, to notice a change; `nil` for an inline policy or a missing file.
    var stamp: FileStamp? {
        guard case .file(let path) = self else { return nil }
        return FileStamp(path: path)
    }
}

/// Identity, size and modification time of a file: a change in any of them means the file changed (editors that
/// write a new file and rename it change the inode).
struct FileStamp: Equatable, Sendable {
    var device: UInt64
    var inode: UInt64
    var size: Int
    var modifiedSeconds: Int
    var modifiedNanoseconds: Int

    init?(path: String) {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        self.device = UInt64(info.st_dev)
        self.inode = UInt64(info.st_ino)
        self.size = Int(info.st_size)
        #if canImport(Darwin)
        self.modifiedSeconds = Int(info.st_mtimespec.tv_sec)
        self.modifiedNanoseconds = Int(info.st_mtimespec.tv_nsec)
        #else
        self.modifiedSeconds = Int(info.st_mtim.tv_sec)
        self.modifiedNanoseconds = Int(info.st_mtim.tv_nsec)
        #endif
    }
}
