import CASCore
import CASTree
import Foundation
import FuseKernel

/// Attributes of every kind of inode. Sizes come from names and Directory
/// messages (anything up to Int64.max): the arithmetic here cannot trap.
extension CASFileSystem {
    /// Blobs carry a fixed timestamp (the epoch of content addressing: 0 is
    /// confusing in listings, so 2000-01-01).
    static let blobTime = FuseTime(seconds: 946_684_800)

    /// The root's, `/sha256`'s and `/tree`'s attributes.
    func fixedDirectoryAttributes(_ ino: UInt64) -> FuseAttributes {
        var a = FuseAttributes(ino: ino, mode: FuseFileType.directory.rawValue
            | (options.writable && ino == FixedInode.sha256 ? 0o755 : 0o555))
        a.nlink = ino == FixedInode.root ? 4 : 2
        a.uid = uid
        a.gid = gid
        a.size = 4096
        a.atime = startTime
        a.ctime = startTime
        // /sha256's listing changes: a new mtime each time its attributes are
        // asked makes the kernel re-read a listing it has cached.
        a.mtime = ino == FixedInode.sha256 ? Self.now() : startTime
        return a
    }

    static func now() -> FuseTime {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return FuseTime(seconds: UInt64(max(0, ts.tv_sec)), nanoseconds: UInt32(ts.tv_nsec))
    }

    /// A blob's attributes; a tree file's variant brings its own mode and
    /// mtime. While a write of a new blob is under way, its size is what
    /// has been written (appends land at the end of what is there).
    func fileAttributes(_ digest: Digest, _ variant: FileVariant?, ino: UInt64, writer: WriteHandle? = nil) -> FuseAttributes {
        // 0444 on every mount: a committed blob never changes, and a tree file
        // shares this inode and its mode.
        var a = FuseAttributes(ino: ino, mode: FuseFileType.regular.rawValue | (variant?.mode ?? 0o444))
        let size = (writer ?? writers.latest(ino))?.visibleSize ?? digest.size
        a.size = UInt64(max(0, size))
        a.blocks = UInt64(size.blocks(of: 512))
        a.uid = uid
        a.gid = gid
        // Tools size their buffers by this: requests are up to 1 MiB.
        a.blksize = 1 << 20
        let t = variant.map { treeTime($0.mtime) } ?? Self.blobTime
        a.atime = t
        a.mtime = t
        a.ctime = t
        return a
    }

    func treeTime(_ t: TreeTime?) -> FuseTime {
        guard let t else { return Self.blobTime }
        // Times before 1970 show as the epoch (fuse_attr holds unsigned seconds).
        return FuseTime(seconds: UInt64(max(0, t.seconds)), nanoseconds: UInt32(clamping: max(0, t.nanos)))
    }

    /// Owner, link count and times of a directory or symlink of a tree.
    func fillTreeAttributes(_ a: inout FuseAttributes, nlink: Int, mtime: TreeTime?) {
        a.nlink = UInt32(clamping: nlink)
        a.uid = uid
        a.gid = gid
        let t = treeTime(mtime)
        a.atime = t
        a.mtime = t
        a.ctime = t
    }

    func negativeEntry(_ reply: FuseReply) {
        // The kernel caches the absence for that long (a blob may appear later).
        reply.entry(.negative(timeout: options.negativeTimeout))
    }
}
