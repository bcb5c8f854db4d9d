import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A counter in a small file beside the database (`<database>-keys`). A `keys` command that changes the registry
/// commits, then rings (adds one to the counter under an exclusive `flock`); the bridge reads the 8 bytes on every
/// authorisation, one `pread` from the page cache, and reloads the registry when they changed. So a revocation or
/// rotation holds from the very next request, with no restart and no polling delay.
///
/// Nothing is mapped into memory, so a file truncated or replaced under the bridge cannot crash it: a short read is
/// just a different value (a reload), and the poll notices a replaced file and opens the new one. The file is opened
/// without following symbolic links, and must be a regular file. The database stays the truth: the bridge also
/// compares the registry's version every few seconds, which covers a bell that could not be rung.
public final class KeyChangeBell: Sendable {
    public let path: String
    private let descriptor: Int32
    /// The file's identity when it was opened: a different one at `path` means this descriptor went stale.
    let identity: FileIdentity

    struct FileIdentity: Equatable {
        var device: UInt64
        var inode: UInt64
    }

    /// Opens the bell of the database at `databasePath`, creating the file when `create` is set. `nil` when it cannot
    /// be opened (the caller falls back to polling).
    public convenience init?(databasePath: String, create: Bool) {
        self.init(path: Self.path(forDatabase: databasePath), create: create)
    }

    public static func path(forDatabase databasePath: String) -> String { databasePath + "-keys" }

    init?(path: String, create: Bool) {
        let descriptor = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW | (create ? O_CREAT : 0), 0o644)
        guard descriptor >= 0 else { return nil }
        var status = stat()
        guard fstat(descriptor, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
            close(descriptor)
            return nil
        }
        self.path = path
        self.descriptor = descriptor
        self.identity = FileIdentity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino))
    }

    deinit {
        close(descriptor)
    }

    /// The number of rings so far (0 for an empty or short file).
    public var value: UInt64 {
        var value: UInt64 = 0
        let read = withUnsafeMutableBytes(of: &value) { pread(descriptor, $0.baseAddress, 8, 0) }
        return read == 8 ? UInt64(littleEndian: value) : 0
    }

    /// Tells every process that reads the bell that the registry changed (after the change is committed). Rings from
    /// several commands at once are serialised by the lock, so none is lost.
    @discardableResult
    public func ring() -> Bool {
        guard flock(descriptor, LOCK_EX) == 0 else { return false }
        defer { flock(descriptor, LOCK_UN) }
        var next = (value &+ 1).littleEndian
        return withUnsafeBytes(of: &next) { pwrite(descriptor, $0.baseAddress, 8, 0) } == 8
    }

    /// Whether the file at `path` is still the one opened.
    var isCurrent: Bool {
        var status = stat()
        guard lstat(path, &status) == 0 else { return false }
        return FileIdentity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino)) == identity
    }
}
