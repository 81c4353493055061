import CASCore
import CASTree
import Foundation
import FuseKernel
import Logging
import Synchronization

let log = Logger(label: "casfs.fuse")

/// The filesystem casfs serves, over the FUSE protocol module. It routes each
/// request to a view by inode: the root and fixed directories
/// (`RootView.swift`), `/sha256` blobs (`BlobView.swift`, writes in
/// `WriteHandle.swift`) and `/tree` (`TreeView.swift`). It holds no storage
/// logic: reads, writes and deletes are calls on the storage stack.
public final class CASFileSystem: FuseFileSystem, @unchecked Sendable {
    public let storage: any Storage
    public let index: (any BlobIndex)?
    public let options: MountOptions
    let stagingDirectory: String
    /// Where blobs land (the disk stores' roots): statfs shows their free
    /// space, the least of them. Empty: the staging directory's.
    let spaceDirectories: [String]
    let recordAccess: (@Sendable (Digest) -> Void)?
    /// OPEN and OPENDIR are answered ENOSYS (read-only mounts by default).
    let openless: Bool
    let metrics: Metrics
    let inodes = InodeTable()
    let treeNodes = TreeInodes()
    /// Parsed Directory blobs of /tree.
    let directories: DirectoryCache
    let handles = HandleTable()
    let passthrough: PassthroughFiles
    /// Open-less reads: the blob of each inode, held from its first read until
    /// the kernel forgets the inode (so a deleted blob stays readable).
    let pinned = PinnedSources(limit: 4096)
    /// Index pages of /sha256 for listings without a directory handle.
    let listingPages = ListingPages()
    /// Uncommitted writes by inode (their sizes are what stat shows).
    let writers = WriterTable()
    /// File inodes the kernel reached through `/sha256` (not only a tree):
    /// when such a blob is found gone, new opens are ENOENT, not EIO.
    let namedInSha256 = Mutex<Set<UInt64>>([])
    let uid: UInt32
    let gid: UInt32
    let startTime: FuseTime
    private let channelBox = Mutex<FuseChannel?>(nil)
    private let onReady = Mutex<(@Sendable () -> Void)?>(nil)
    /// Notifications go out from here, never from a request's own handler.
    private let notifications = DispatchQueue(label: "casfs-fuse-notify")
    let counters: Counters
    private let perOp: [UInt32: OpMetrics]

    /// Entries fetched per index page when listing /sha256.
    let listPageSize = 1000

    struct Counters: Sendable {
        let readBytes, writeBytes, errors: MetricCounter
    }

    struct OpMetrics: Sendable {
        let count: MetricCounter
        let duration: MetricHistogram
    }

    /// - Parameters:
    ///   - stagingDirectory: where files being written are staged (private, unlinked).
    ///   - spaceDirectories: where blobs land (disk stores), for statfs.
    ///   - recordAccess: called (must not block) when a blob is opened for reading.
    public init(storage: any Storage, index: (any BlobIndex)?, options: MountOptions,
                stagingDirectory: String, spaceDirectories: [String] = [],
                recordAccess: (@Sendable (Digest) -> Void)?, metrics: Metrics = Metrics()) {
        self.storage = storage
        self.index = index
        self.options = options
        self.openless = options.isOpenless
        self.stagingDirectory = stagingDirectory
        self.spaceDirectories = spaceDirectories
        self.recordAccess = recordAccess
        self.metrics = metrics
        self.directories = DirectoryCache(storage: storage, capacity: options.treeCacheBytes, metrics: metrics)
        self.passthrough = PassthroughFiles(enabled: options.passthrough && !options.isOpenless,
                                            opens: metrics.counter(MetricCatalog.passthroughOpens))
        self.counters = Counters(readBytes: metrics.counter(MetricCatalog.readBytes),
                                 writeBytes: metrics.counter(MetricCatalog.writeBytes),
                                 errors: metrics.counter(MetricCatalog.fuseErrors))
        var ops: [UInt32: OpMetrics] = [:]
        let buckets: [Duration] = [.microseconds(20), .microseconds(50), .microseconds(100), .microseconds(250),
                                   .microseconds(500), .milliseconds(1), .milliseconds(2.5), .milliseconds(5),
                                   .milliseconds(10), .milliseconds(25), .milliseconds(100), .milliseconds(500),
                                   .seconds(1), .seconds(5)]
        for op: FuseOpcode in [.lookup, .forget, .batchForget, .getattr, .setattr, .readlink, .open, .read, .write,
                               .statfs, .release, .fsync, .getxattr, .listxattr, .flush, .opendir, .readdir,
                               .readdirplus, .releasedir, .create, .unlink] {
            let labels = [("op", op.name)]
            ops[op.rawValue] = OpMetrics(count: metrics.counter(MetricCatalog.fuseRequests, labels),
                                         duration: metrics.histogram(MetricCatalog.fuseDuration, labels, buckets: buckets))
        }
        self.perOp = ops
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        self.startTime = FuseTime(seconds: UInt64(max(0, ts.tv_sec)), nanoseconds: UInt32(ts.tv_nsec))
        self.uid = getuid()
        self.gid = getgid()
        let inodeGauge = metrics.gauge(MetricCatalog.inodes)
        let treeGauge = metrics.gauge(MetricCatalog.treeInodes)
        metrics.onCollect { [inodes, treeNodes] in
            inodeGauge.set(Int64(inodes.count))
            treeGauge.set(Int64(treeNodes.count))
        }
    }

    // MARK: connection

    public func negotiate(_ offer: FuseInitIn) -> FuseInitReply {
        var flags: FuseInitFlags = [.asyncRead, .bigWrites, .doReaddirplus, .readdirplusAuto, .parallelDirops,
                                    .maxPages, .cacheSymlinks, .autoInvalData, .noOpenSupport, .noOpendirSupport]
        // Passthrough needs CAP_SYS_ADMIN; without it the first backing open
        // fails with EPERM and reads are served by the daemon.
        if passthrough.wanted { flags.insert(.passthrough) }
        var r = FuseInitReply(flags: flags, maxReadahead: UInt32(options.maxRead), maxWrite: 1 << 20)
        r.maxStackDepth = UInt32(max(1, min(2, options.passthroughStackDepth)))
        return r
    }

    public func connected(_ info: FuseConnectionInfo, _ channel: FuseChannel) {
        channelBox.withLock { $0 = channel }
        passthrough.connect(channel, agreed: info.flags.contains(.passthrough))
        log.info("FUSE 7.\(info.minor): passthrough \(passthrough.isOn ? "on" : "off"), \(openless ? "open-less" : "with OPEN"), requests up to \(info.maxWrite) bytes")
        if let ready = onReady.withLock({ r -> (@Sendable () -> Void)? in defer { r = nil }; return r }) { ready() }
    }

    /// `body` runs once, when the kernel has initialised the connection.
    public func whenReady(_ body: @escaping @Sendable () -> Void) { onReady.withLock { $0 = body } }

    var channel: FuseChannel? { channelBox.withLock { $0 } }

    /// Drops the kernel's cached pages of `ino` (after a reader got EIO for
    /// corrupt bytes), from another thread.
    func invalidatePages(_ ino: UInt64) {
        guard let channel else { return }
        notifications.async { channel.invalidateInode(ino) }
    }

    /// The stored copy of `digest` was replaced or removed behind the
    /// mount (a scrub repair): drops the kernel's cached pages of its file.
    public func blobChanged(_ digest: Digest) {
        invalidatePages(blobInode(digest))
    }

    /// Drops the kernel's entry `name` in `parent` (a blob found gone).
    func invalidateEntry(parent: UInt64, name: String) {
        guard let channel else { return }
        notifications.async { channel.invalidateEntry(parent: parent, name: Array(name.utf8)) }
    }

    // MARK: dispatch

    public func handle(_ h: FuseRequestHeader, _ op: FuseOperation, _ reply: FuseReply) {
        let start = ContinuousClock.now
        switch op {
        case .lookup(let name): lookup(parent: h.nodeid, name: name, reply)
        case .forget(let n):
            forget(h.nodeid, n)
            reply.none()
        case .batchForget(let items):
            for i in items { forget(i.nodeid, i.nlookup) }
            reply.none()
        case .getattr(let fh): getattr(h.nodeid, fh: fh, reply)
        case .setattr(let s): setattr(h, s, reply)
        case .readlink: readlink(h.nodeid, reply)
        case .open(let flags): open(h, flags: flags, reply)
        case .read(let fh, let offset, let size): read(h.nodeid, fh: fh, offset: offset, size: size, reply)
        case .write(let fh, let offset, let data): write(h, fh: fh, offset: offset, data: data, reply)
        case .flush(let fh): flush(h, fh: fh, reply)
        case .release(let fh, _): release(h.nodeid, fh: fh, reply)
        case .fsync(let fh): fsync(fh: fh, reply)
        case .create(let name, let flags, _): create(h, parent: h.nodeid, name: name, flags: flags, reply)
        case .unlink(let name): unlink(parent: h.nodeid, name: name, reply)
        case .mknod(let name, let mode): mknod(parent: h.nodeid, name: name, mode: mode, reply)
        case .opendir: opendir(h.nodeid, reply)
        case .readdir(let fh, let offset, let size, let plus):
            readdir(h.nodeid, fh: fh, offset: offset, size: Int(size), plus: plus, reply)
        case .releasedir(let fh):
            handles.remove(fh)
            reply.ok()
        case .fsyncdir: reply.ok()
        case .statfs: statfs(reply)
        case .getxattr(let name, let size): getxattr(h.nodeid, name: name.string, size: Int(size), reply)
        case .listxattr(let size): listxattr(h.nodeid, size: Int(size), reply)
        case .access: reply.ok()
        case .setxattr, .removexattr, .mkdir, .rmdir, .symlink, .link, .rename, .refusedChange:
            reply.error(changeErrno)
        case .lseek: reply.error(ENOSYS)
        case .initialize, .interrupt, .destroy, .unsupported:
            reply.error(ENOSYS)
        }
        if let m = perOp[h.opcode] {
            m.count.add()
            m.duration.record(ContinuousClock.now - start)
        }
    }

    // MARK: shared helpers

    /// EPERM on a writable mount (blobs are immutable), EROFS on a read-only one.
    var changeErrno: Int32 { options.writable ? EPERM : EROFS }

    /// Logs a failed operation and answers with its errno; corrupt bytes
    /// also drop the inode's cached pages.
    func fail(_ reply: FuseReply, _ op: String, _ error: Error, _ what: CustomStringConvertible? = nil, ino: UInt64? = nil) {
        let e = StorageError.wrap(error)
        counters.errors.add()
        log.error("\(op)\(what.map { " \($0)" } ?? ""): \(e)")
        reply.error(e.errno)
        if case .corrupt = e, let ino {
            invalidatePages(ino)
            // The corrupt copy was removed: the next open looks the name up again.
            if namedInSha256.withLock({ $0.contains(ino) }), let file = inodes.file(ino) {
                invalidateEntry(parent: FixedInode.sha256, name: file.digest.description)
            }
        }
    }

    func forget(_ ino: UInt64, _ n: UInt64) {
        if TreeInodes.isTreeNode(ino) {
            treeNodes.forget(ino, n)
        } else if inodes.forget(ino, n) {
            pinned.drop(ino)
            namedInSha256.withLock { _ = $0.remove(ino) }
        }
    }

    /// True for every directory inode: the fixed ones and those inside trees.
    func isDirectory(_ ino: UInt64) -> Bool {
        if FixedInode.contains(ino) { return true }
        if let n = treeNodes.node(ino), case .directory = n.kind { return true }
        return false
    }

    func isKnown(_ ino: UInt64) -> Bool {
        FixedInode.contains(ino) || inodes.file(ino) != nil || treeNodes.node(ino) != nil
    }

    func lookup(parent: UInt64, name: FuseName, _ reply: FuseReply) {
        switch parent {
        case FixedInode.root: lookupRoot(name, reply)
        case FixedInode.tree: lookupTreeRoot(name, reply)
        case FixedInode.sha256: lookupBlob(name, reply)
        default:
            if let node = treeNodes.node(parent) {
                guard case .directory(let digest) = node.kind else { return reply.error(ENOTDIR) }
                lookupInTree(parent: parent, digest: digest, name: name, reply)
            } else {
                reply.error(inodes.file(parent) != nil ? ENOTDIR : ENOENT)
            }
        }
    }

    func getattr(_ ino: UInt64, fh: UInt64?, _ reply: FuseReply) {
        if FixedInode.contains(ino) {
            reply.attributes(dirAttributes(ino), timeout: ino == FixedInode.sha256 ? listingTimeout : options.attrTimeout)
        } else if let f = inodes.file(ino) {
            reply.attributes(fileAttributes(f.digest, f.variant, ino: ino, writer: fh.flatMap { handles.write($0) }),
                             timeout: writers.active(ino) ? 0 : attrTimeout)
        } else if let node = treeNodes.node(ino) {
            reply.attributes(treeNodeAttributes(ino, node), timeout: options.attrTimeout)
        } else {
            reply.error(ENOENT)
        }
    }

    func readlink(_ ino: UInt64, _ reply: FuseReply) {
        guard let node = treeNodes.node(ino) else {
            return reply.error(inodes.file(ino) != nil || FixedInode.contains(ino) ? EINVAL : ENOENT)
        }
        guard case .symlink(let target) = node.kind else { return reply.error(EINVAL) }
        // Returned as text: the kernel resolves it, from the caller's view.
        reply.bytes(Array(target.utf8))
    }

    /// Blob entries on an open-less mount expire sooner, so that the lookups
    /// that refresh a used blob's access time keep coming (a blob read from the
    /// kernel's cache every day must not look unused to cleanup).
    var entryTimeout: Double { openless ? min(options.entryTimeout, Self.openlessEntryTimeout) : options.entryTimeout }
    var attrTimeout: Double { openless ? min(options.attrTimeout, Self.openlessEntryTimeout) : options.attrTimeout }
    static let openlessEntryTimeout: Double = 300
    /// /sha256 changes as blobs come and go: its attributes (and so the
    /// kernel's cached listing, whose validity follows the directory's mtime)
    /// are refreshed this often.
    var listingTimeout: Double { 1 }
}
