import Atomics
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A counter in a small file beside the database (`<database>-keys`), mapped into memory by the bridge and by the
/// `keys` commands. A command that changes the registry commits, then rings (increments the counter); the bridge
/// reads the counter on every request, which costs one memory load, and reloads the registry when it moved. So a
/// revocation or rotation holds from the very next request, with no restart and no polling delay.
///
/// The database stays the truth: the bridge also compares the registry's version every few seconds, which covers a
/// bell that could not be rung (a file the command may not write) or was replaced.
public final class KeyChangeBell: @unchecked Sendable {
    public let path: String
    private let mapping: UnsafeMutableRawPointer
    private let counter: UnsafeAtomic<UInt64>
    /// The file's identity when it was mapped: a different one at `path` means the mapping went stale.
    let identity: FileIdentity

    struct FileIdentity: Equatable {
        var device: UInt64
        var inode: UInt64
    }

    static let size = 8

    /// Maps the bell of the database at `databasePath`, creating the file when `create` is set. `nil` when it cannot
    /// be opened or mapped (the caller falls back to polling).
    public convenience init?(databasePath: String, create: Bool) {
        self.init(path: Self.path(forDatabase: databasePath), create: create)
    }

    public static func path(forDatabase databasePath: String) -> String { databasePath + "-keys" }

    init?(path: String, create: Bool) {
        let descriptor = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0o644)
        guard descriptor >= 0 else { return nil }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else { return nil }
        // Growing the file is safe to race: both would set the same size, and the new bytes read as zero.
        if status.st_size < Self.size, ftruncate(descriptor, off_t(Self.size)) != 0 { return nil }
        guard let mapped = mmap(nil, Self.size, PROT_READ | PROT_WRITE, MAP_SHARED, descriptor, 0),
            mapped != MAP_FAILED
        else { return nil }
        self.path = path
        self.mapping = mapped
        self.counter = UnsafeAtomic(at: mapped.assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
        self.identity = FileIdentity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino))
    }

    deinit {
        munmap(mapping, Self.size)
    }

    /// The number of rings so far.
    public var value: UInt64 { counter.load(ordering: .acquiring) }

    /// Tells every process that maps the bell that the registry changed (after the change is committed).
    public func ring() {
        counter.wrappingIncrement(ordering: .releasing)
    }

    /// Whether the file at `path` is still the one mapped.
    var isCurrent: Bool {
        var status = stat()
        guard stat(path, &status) == 0 else { return false }
        return FileIdentity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino)) == identity
    }
}
