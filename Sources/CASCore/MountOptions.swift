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
    /// Where to serve the metrics over HTTP (`GET /metrics`, Prometheus's
    /// text format); nil: not served.
    public var metricsAddress: ListenAddress?

    public init() {}
}
