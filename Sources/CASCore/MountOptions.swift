import Foundation

/// casfs's own mount options (the `mount:` section of a config, `-o` on the command line).
public struct MountOptions: Sendable, Equatable {
    /// Allow create/write/unlink of blobs.
    public var writable = false
    /// Seconds the kernel may cache positive lookups (content is immutable).
    public var entryTimeout: Double = 86_400
    /// Seconds the kernel may cache attributes.
    public var attrTimeout: Double = 86_400
    /// Seconds the kernel may cache a "no such blob" answer (a blob may appear later).
    public var negativeTimeout: Double = 1
    /// FUSE worker threads (0: libfuse's default).
    public var threads = 0
    /// Largest read request in bytes.
    public var maxRead = 1 << 20
    /// Let other users see the mount (needs user_allow_other for non-root).
    public var allowOther = false
    /// Name shown in /proc/mounts.
    public var fsName = "casfs"
    /// Bytes of parsed REAPI Directory blobs kept for /tree.
    public var treeCacheBytes: Int64 = 32 << 20
    /// When a tree directory is first used, hint the storage to fetch its
    /// small files in bulk (one round trip per batch to a remote CAS).
    public var treePrefetch = true
    /// The permission bits /tree directories show when their Directory has
    /// no `unix_mode` (nil: 0555). 0755 lets an overlay mounted over a tree
    /// create files in its directories (the mount itself stays read-only).
    public var treeDirectoryMode: UInt32?

    /// Parses a mode written in octal (`755`, `0755`, `0o755`), at most 0777.
    public static func parseMode(_ text: String) -> UInt32? {
        var digits = Substring(text.trimmingCharacters(in: .whitespaces))
        if digits.hasPrefix("0o") { digits = digits.dropFirst(2) }
        guard !digits.isEmpty, digits.count <= 4, let v = UInt32(digits, radix: 8), v <= 0o777 else { return nil }
        return v
    }
    /// Open-less opens (the kernel opens files and directories without asking
    /// the daemon): nil means the default, on for read-only mounts. Writable
    /// mounts always keep OPEN (writes and passthrough need it).
    public var openless: Bool?
    /// Hand verified local blob files to the kernel to read directly.
    public var passthrough = true
    /// Filesystems that may lie under a passthrough backing file: 1 for a
    /// store on ext4/xfs, 2 for one on overlayfs (containers); the casfs
    /// mount itself can then not be stacked on.
    public var passthroughStackDepth = 1

    /// Whether this mount answers OPEN with ENOSYS (see `openless`).
    public var isOpenless: Bool { !writable && (openless ?? true) }
    /// Seconds between background scrubs of the disk stores (counted from
    /// the start of one pass to the start of the next); 0: no background scrub.
    public var scrubInterval: Double = 0
    /// Bytes per second a background scrub reads at most.
    public var scrubRate: Int64 = 16 << 20
    /// The configuration file the mount serves (absolute), published on
    /// the mount's root so commands given `--mount` find its stores.
    public var configPath: String?
    /// Where to serve the metrics over HTTP (`GET /metrics`, Prometheus's
    /// text format); nil: not served.
    public var metricsAddress: ListenAddress?

    public init() {}
}
