import CASCore
import CASTree
import Foundation
import FuseKernel
import Logging
import Synchronization

let log = Logger(label: "casfs.fuse")
/// Lines that requests can trigger (bad trees, gone or damaged blobs, a
/// failing storage), folded so that no client floods the log.
let folded = LogFolder(logger: log)

/// The filesystem casfs serves, over the FUSE protocol module. Each request's
/// inode is resolved once to its node (`Node.swift`): the root and `/tree`
/// (`RootNodes.swift`), `/sha256` (`Sha256Directory.swift`), a blob
/// (`BlobNode.swift`, writes in `WriteHandle.swift`), a directory or symlink
/// of a tree (`TreeNodes.swift`); the node answers. Requests on an open
/// file (write, flush, release) go by handle. It holds no storage logic:
/// reads, writes and deletes are calls on the storage stack.
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
    /// The nodes the kernel holds (the fixed directories are not in it).
    let nodes = NodeTable()
    /// Gives the memory of forgotten nodes back to the system.
    let trimmer = MemoryTrimmer()
    let root = RootNode()
    let sha256Directory = Sha256Directory()
    let treeRoot = TreeRootNode()
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
    let uid: UInt32
    let gid: UInt32
    let startTime: FuseTime
    private let channelBox = Mutex<FuseChannel?>(nil)
    private let feederBox = Mutex<PageCacheFeeder?>(nil)
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
        let trimmer = self.trimmer
        self.directories = DirectoryCache(storage: storage, capacity: options.treeCacheBytes, metrics: metrics) { entries in
            // Parsing a big Directory freed a lot of memory again.
            if entries >= 10_000 { trimmer.freed(entries) }
        }
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
        metrics.onCollect { [nodes] in
            inodeGauge.set(Int64(nodes.fileCount))
            treeGauge.set(Int64(nodes.otherCount))
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
        // Open-less mounts: the kernel's page cache is the only one readers
        // use, so small blobs are pushed into it ahead of their reads.
        if openless {
            let nodes = self.nodes
            let feeder = PageCacheFeeder(storage: storage, channel: channel, metrics: metrics) { ino, digest in
                (nodes[ino] as? FileNode)?.digest == digest
            }
            feederBox.withLock { $0 = feeder }
        }
        passthrough.connect(channel, agreed: info.flags.contains(.passthrough))
        log.info("FUSE 7.\(info.minor): passthrough \(passthrough.isOn ? "on" : "off"), \(openless ? "open-less" : "with OPEN"), requests up to \(info.maxWrite) bytes")
        if let ready = onReady.withLock({ r -> (@Sendable () -> Void)? in defer { r = nil }; return r }) { ready() }
    }

    public func disconnected() {
        feederBox.withLock { f in
            f?.stop()
            f = nil
        }
    }

    /// `body` runs once, when the kernel has initialised the connection.
    public func whenReady(_ body: @escaping @Sendable () -> Void) { onReady.withLock { $0 = body } }

    /// Pushes small blobs into the page cache (open-less mounts, once connected).
    var feeder: PageCacheFeeder? { feederBox.withLock { $0 } }

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

    /// The node of an inode: a fixed directory, or one the kernel holds.
    func fixedNode(_ ino: UInt64) -> (any Node)? {
        switch ino {
        case FixedInode.root: return root
        case FixedInode.sha256: return sha256Directory
        case FixedInode.tree: return treeRoot
        default: return nil
        }
    }

    func node(_ ino: UInt64) -> (any Node)? { fixedNode(ino) ?? nodes[ino] }

    public func handle(_ h: FuseRequestHeader, _ op: FuseOperation, _ reply: FuseReply) {
        let start = ContinuousClock.now
        dispatch(h, op, reply)
        if let m = perOp[h.opcode] {
            m.count.add()
            m.duration.record(ContinuousClock.now - start)
        }
    }

    private func dispatch(_ h: FuseRequestHeader, _ op: FuseOperation, _ reply: FuseReply) {
        // Requests that go by handle or concern the whole mount.
        switch op {
        case .forget(let n):
            forgetNode(h.nodeid, n)
            return reply.none()
        case .batchForget(let items):
            for i in items { forgetNode(i.nodeid, i.nlookup) }
            return reply.none()
        case .read(let fh, let offset, let size):
            return read(Request(header: h, reply: reply, fs: self), fh: fh, offset: offset, size: size)
        case .write(let fh, let offset, let data): return write(h, fh: fh, offset: offset, data: data, reply)
        case .flush(let fh): return flush(h, fh: fh, reply)
        case .release(let fh, _): return release(fh: fh, reply)
        case .fsync(let fh): return fsync(fh: fh, reply)
        case .releasedir(let fh):
            handles.remove(fh)
            return reply.ok()
        case .fsyncdir, .access: return reply.ok()
        case .statfs: return statfs(reply)
        case .setxattr, .removexattr, .mkdir, .rmdir, .symlink, .link, .rename, .refusedChange:
            return reply.error(changeErrno)
        case .lseek, .initialize, .interrupt, .destroy, .unsupported:
            return reply.error(ENOSYS)
        default:
            break
        }
        guard let node = node(h.nodeid) else {
            // create, unlink, mknod in an unknown directory: not a directory
            // of this mount (after EROFS on a read-only one).
            switch op {
            case .create, .unlink: return reply.error(options.writable ? ENOTDIR : EROFS)
            case .mknod: return reply.error(changeErrno)
            default: return reply.error(ENOENT)
            }
        }
        let r = Request(header: h, reply: reply, fs: self)
        switch op {
        case .lookup(let name): node.lookup(r, name)
        case .getattr(let fh): node.getattr(r, fh: fh)
        case .setattr(let s): node.setattr(r, s)
        case .readlink: node.readlink(r)
        case .open(let flags): node.open(r, flags: flags)
        case .create(let name, let flags, _): node.create(r, name: name, flags: flags)
        case .unlink(let name): node.unlink(r, name: name)
        case .mknod(let name, let mode): node.mknod(r, name: name, mode: mode)
        case .opendir: node.opendir(r)
        case .readdir(let fh, let offset, let size, let plus): node.readdir(r, fh: fh, offset: offset, size: Int(size), plus: plus)
        case .getxattr(let name, let size):
            let key = name.string
            // Only user.* attributes exist here. Saying so (rather than "no
            // such attribute") lets ls -l stop asking for security labels
            // and ACLs after the first file of the mount.
            guard key.hasPrefix("user.") else { return reply.error(EOPNOTSUPP) }
            guard let value = node.xattr(self, name: key) else { return reply.error(ENODATA) }
            // The statistics change all the time: the size a caller asks for
            // first leaves room for them to grow before it reads them.
            if size == 0 && key == Self.statsXattr { return reply.xattrSize(min(value.count + 4096, 65536)) }
            replyXattr(value, size: Int(size), reply)
        case .listxattr(let size):
            var bytes: [UInt8] = []
            for n in node.xattrNames(self) { bytes += Array(n.utf8) + [0] }
            replyXattr(bytes, size: Int(size), reply)
        default:
            reply.error(ENOSYS)
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
        let subject = what.map { " \($0)" } ?? ""
        // Folded by operation and blob (a read's offset is not part of the key).
        folded.error(kind: op, key: String(subject.split(separator: " ").first ?? ""), "\(op)\(subject): \(e)")
        reply.error(e.errno)
        if case .corrupt = e, let ino {
            invalidatePages(ino)
            // The corrupt copy was removed: the next open looks the name up again.
            if let file = nodes[ino] as? FileNode, file.isNamedInSha256 {
                invalidateEntry(parent: FixedInode.sha256, name: file.digest.description)
            }
        }
    }

    /// The kernel dropped `n` references to `ino`.
    func forgetNode(_ ino: UInt64, _ n: UInt64) {
        guard let node = nodes.forget(ino, n) else { return }
        node.forgotten(self)
        trimmer.freed(1)
    }

    /// One entry of a listing; false when it does not fit. `entry`: for
    /// READDIRPLUS, the entry the kernel will count as looked up (nil: name
    /// and type only, the kernel looks it up itself).
    func addListed(_ filler: inout DirectoryFiller, _ name: String, _ attrs: FuseAttributes, next: UInt64, plus: Bool,
                   entry: FuseEntry?) -> Bool {
        let type = FuseFileType(rawValue: attrs.mode & UInt32(S_IFMT)) ?? .regular
        return Array(name.utf8).withUnsafeBytes { n in
            if plus {
                var e = entry ?? FuseEntry(nodeid: 0, entryTimeout: 0, attrTimeout: 0, attributes: attrs)
                e.attributes.ino = attrs.ino
                return filler.add(name: n, entry: e, type: type, nextOffset: next)
            }
            return filler.add(name: n, ino: attrs.ino, type: type, nextOffset: next)
        }
    }

    // MARK: xattrs

    static let checksumXattr = "user.checksum.sha256"
    static let digestXattr = "user.casfs.digest"
    static let statsXattr = "user.casfs.stats"
    /// The configuration file the mount serves (absent on a zero-config mount).
    static let configXattr = "user.casfs.config"

    func replyXattr(_ value: [UInt8], size: Int, _ reply: FuseReply) {
        if size == 0 {
            reply.xattrSize(value.count)
        } else if size < value.count {
            reply.error(ERANGE)
        } else {
            reply.bytes(value)
        }
    }

    /// Every metric of the mount as one JSON object (`name{labels}` →
    /// value), histogram buckets left out (the attribute has a 64 KiB limit).
    public func statisticsJSON() -> String {
        let snap = metrics.snapshot().filter { !$0.key.contains("_bucket{") }
        let body = snap.keys.sorted().map { k -> String in
            let v = snap[k]!
            let num = v == v.rounded() && abs(v) < 1e15 ? String(Int64(v)) : String(v)
            return "\(jsonString(k)):\(num)"
        }.joined(separator: ",")
        return "{\(body)}"
    }

    /// Blob entries on an open-less mount expire sooner, so that the lookups
    /// that refresh a used blob's access time keep coming (a blob read from the
    /// kernel's cache every day must not look unused to cleanup).
    var entryTimeout: Double { openless ? min(options.entryTimeout, Self.openlessEntryTimeout) : options.entryTimeout }
    var attrTimeout: Double { openless ? min(options.attrTimeout, Self.openlessEntryTimeout) : options.attrTimeout }
    static let openlessEntryTimeout: Double = 300
    /// "Never expires", for answers that cannot change (a name a tree does not have).
    static let forever: Double = 1e9
    /// /sha256 changes as blobs come and go: its attributes (and so the
    /// kernel's cached listing, whose validity follows the directory's mtime)
    /// are refreshed this often.
    var listingTimeout: Double { 1 }
}

/// `s` as a JSON string literal.
func jsonString(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        default:
            if u.value < 0x20 { out += String(format: "\\u%04x", u.value) } else { out.unicodeScalars.append(u) }
        }
    }
    return out + "\""
}
