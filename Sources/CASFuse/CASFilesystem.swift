import CASCore
import CASTree
import CFuse
import Foundation
import Logging
import Synchronization

let log = Logger(label: "casfs.fuse")

/// The FUSE low-level driver: translates kernel requests into `Storage` calls
/// (plus the optional index for listing, totals and access times). It holds no
/// storage logic of its own.
public final class CASFilesystem: Sendable {
    public let storage: any Storage
    public let index: (any BlobIndex)?
    public let options: MountOptions
    let stagingDirectory: String
    let recordAccess: (@Sendable (Digest) -> Void)?
    /// Read-only mounts only: answer OPEN with ENOSYS so that the kernel stops
    /// sending OPEN/RELEASE (much faster small-file access). Access times are
    /// then refreshed at lookup and at reads that reach the daemon, not at every open.
    let openless: Bool
    let inodes = InodeTable()
    let treeNodes = TreeInodes()
    /// Parsed Directory blobs of /tree.
    let directories: DirectoryCache
    let startTime: timespec
    let uid: uid_t
    let gid: gid_t
    let onReady = Mutex<(@Sendable () -> Void)?>(nil)
    let metrics: Metrics
    let counters: Counters

    /// Entries fetched per index page when listing /sha256.
    let listPageSize = 1000

    struct Counters: Sendable {
        let lookups, opens, reads, readBytes, errors: MetricCounter
        init(_ m: Metrics) {
            lookups = m.counter(MetricCatalog.fuseRequests, [("op", "lookup")])
            opens = m.counter(MetricCatalog.fuseRequests, [("op", "open")])
            reads = m.counter(MetricCatalog.fuseRequests, [("op", "read")])
            readBytes = m.counter(MetricCatalog.readBytes)
            errors = m.counter(MetricCatalog.fuseErrors)
        }
    }

    /// - Parameters:
    ///   - stagingDirectory: where files being written are staged (private, unlinked).
    ///   - recordAccess: called (must not block) on every open of a blob for reading.
    public init(storage: any Storage, index: (any BlobIndex)?, options: MountOptions,
                stagingDirectory: String, recordAccess: (@Sendable (Digest) -> Void)?,
                openless: Bool = false, metrics: Metrics = Metrics()) {
        self.openless = openless && !options.writable
        self.metrics = metrics
        self.counters = Counters(metrics)
        self.directories = DirectoryCache(storage: storage, capacity: options.treeCacheBytes, metrics: metrics)
        let inodeGauge = metrics.gauge(MetricCatalog.inodes)
        let treeGauge = metrics.gauge(MetricCatalog.treeInodes)
        metrics.onCollect { [inodes, treeNodes] in
            inodeGauge.set(Int64(inodes.count))
            treeGauge.set(Int64(treeNodes.count))
        }
        self.storage = storage
        self.index = index
        self.options = options
        self.stagingDirectory = stagingDirectory
        self.recordAccess = recordAccess
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        self.startTime = ts
        self.uid = getuid()
        self.gid = getgid()
    }

    // MARK: attributes

    /// Blobs carry a fixed timestamp (the epoch of content addressing: 0 is
    /// confusing in listings, so use 2000-01-01).
    static let blobTime = timespec(tv_sec: 946_684_800, tv_nsec: 0)

    func dirAttr(_ ino: UInt64) -> stat {
        var st = stat()
        st.st_ino = UInt(ino)
        // /tree is read-only even on a writable mount.
        st.st_mode = S_IFDIR | (options.writable && ino != FixedInode.tree ? 0o755 : 0o555)
        st.st_nlink = ino == FixedInode.root ? 4 : 2
        st.st_uid = uid
        st.st_gid = gid
        st.st_blksize = 4096
        st.st_atim = startTime
        st.st_mtim = startTime
        st.st_ctim = startTime
        return st
    }

    /// A blob's attributes; a tree file's variant brings its own mode and mtime.
    func fileAttr(_ digest: Digest, _ variant: FileVariant?, ino: UInt64) -> stat {
        var st = stat()
        st.st_ino = UInt(ino)
        // 0444 on every mount: a committed blob never changes (a writable mount
        // creates new names), and a tree file shares this inode and its mode.
        st.st_mode = S_IFREG | (variant?.mode ?? 0o444)
        st.st_nlink = 1
        st.st_uid = uid
        st.st_gid = gid
        st.st_size = Int(digest.size)
        st.st_blksize = 4096
        st.st_blocks = Int(digest.size.blocks(of: 512))
        let t = variant.map { treeTime($0.mtime) } ?? Self.blobTime
        st.st_atim = t
        st.st_mtim = t
        st.st_ctim = t
        return st
    }

    func blobAttr(_ digest: Digest, ino: UInt64) -> stat { fileAttr(digest, nil, ino: ino) }

    /// True for every directory inode: the fixed ones and those inside trees.
    func isDirectory(_ ino: UInt64) -> Bool {
        if FixedInode.contains(ino) { return true }
        if let n = treeNodes.node(ino), case .directory = n.kind { return true }
        return false
    }

    /// True if the inode is known at all.
    func isKnown(_ ino: UInt64) -> Bool {
        FixedInode.contains(ino) || inodes.file(ino) != nil || treeNodes.node(ino) != nil
    }

    func entry(ino: UInt64, attr: stat, timeout: Double) -> fuse_entry_param {
        var e = fuse_entry_param()
        e.ino = ino
        e.generation = 1
        e.attr = attr
        e.attr_timeout = timeout
        e.entry_timeout = timeout
        return e
    }

    // MARK: errors

    func fail(_ req: fuse_req_t?, _ op: String, _ error: Error, _ what: CustomStringConvertible? = nil) {
        let e = StorageError.wrap(error)
        counters.errors.add()
        log.error("\(op)\(what.map { " \($0)" } ?? ""): \(e)")
        fuse_reply_err(req, e.errno)
    }

    var changeErrno: Int32 { options.writable ? EPERM : EROFS }

    func replyErr(_ req: fuse_req_t?, _ e: Int32) { _ = fuse_reply_err(req, e) }

    // MARK: lookup / attributes

    /// True if the digest is present.
    func exists(_ digest: Digest) throws -> Bool {
        try storage.hasBlob(digest)
    }

    func lookup(_ req: fuse_req_t?, parent: UInt64, name nameBytes: [UInt8]) {
        counters.lookups.add()
        let name = String(decoding: nameBytes, as: UTF8.self)
        switch parent {
        case FixedInode.root:
            if name == "sha256" || name == "tree" {
                let ino = name == "sha256" ? FixedInode.sha256 : FixedInode.tree
                var e = entry(ino: ino, attr: dirAttr(ino), timeout: options.entryTimeout)
                fuse_reply_entry(req, &e)
            } else {
                replyNegative(req)
            }
        case FixedInode.tree:
            lookupTreeRoot(req, name: nameBytes)
        case FixedInode.sha256:
            guard let digest = Digest(parsing: name) else { return replyNegative(req) }
            do {
                guard try exists(digest) else { return replyNegative(req) }
                if openless { recordAccess?(digest) }
                replyBlobEntry(req, digest, timeout: options.entryTimeout)
            } catch {
                fail(req, "lookup", error, digest)
            }
        default:
            if let node = treeNodes.node(parent) {
                guard case .directory(let digest) = node.kind else { return replyErr(req, ENOTDIR) }
                lookupInTree(req, parent: parent, digest: digest, name: nameBytes)
            } else {
                replyErr(req, inodes.file(parent) != nil ? ENOTDIR : ENOENT)
            }
        }
    }

    func replyNegative(_ req: fuse_req_t?) {
        // ino 0 with a timeout: the kernel caches the absence for that long.
        var e = fuse_entry_param()
        e.ino = 0
        e.entry_timeout = options.negativeTimeout
        fuse_reply_entry(req, &e)
    }

    func rememberBlob(_ digest: Digest, _ variant: FileVariant? = nil) -> UInt64? {
        switch inodes.remember(digest, variant) {
        case .ok(let ino): return ino
        case .collision(let ino, let other):
            log.error("inode \(ino) collision: \(digest) and \(other)")
            return nil
        }
    }

    func replyBlobEntry(_ req: fuse_req_t?, _ digest: Digest, timeout: Double) {
        replyFileEntry(req, digest, nil, timeout: timeout)
    }

    func replyFileEntry(_ req: fuse_req_t?, _ digest: Digest, _ variant: FileVariant?, timeout: Double) {
        guard let ino = rememberBlob(digest, variant) else { fuse_reply_err(req, EIO); return }
        var e = entry(ino: ino, attr: fileAttr(digest, variant, ino: ino), timeout: timeout)
        if fuse_reply_entry(req, &e) != 0 { inodes.forget(ino, 1) }
    }

    func forget(_ ino: UInt64, _ n: UInt64) {
        if TreeInodes.isTreeNode(ino) {
            treeNodes.forget(ino, n)
        } else {
            inodes.forget(ino, n)
        }
    }

    func getattr(_ req: fuse_req_t?, ino: UInt64) {
        if FixedInode.contains(ino) {
            var st = dirAttr(ino)
            fuse_reply_attr(req, &st, options.attrTimeout)
        } else if let f = inodes.file(ino) {
            var st = fileAttr(f.digest, f.variant, ino: ino)
            fuse_reply_attr(req, &st, options.attrTimeout)
        } else if let node = treeNodes.node(ino) {
            var st = treeNodeAttr(ino, node)
            fuse_reply_attr(req, &st, options.attrTimeout)
        } else {
            fuse_reply_err(req, ENOENT)
        }
    }

    func setattr(_ req: fuse_req_t?, ino: UInt64, attr: UnsafeMutablePointer<stat>?, toSet: Int32,
                 fi: UnsafeMutablePointer<fuse_file_info>?) {
        guard options.writable else { return replyErr(req, EROFS) }
        guard let file = inodes.file(ino) else { return replyErr(req, isKnown(ino) ? EPERM : ENOENT) }
        let digest = file.digest
        let timesOnly = FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW
            | FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME
        if toSet & FUSE_SET_ATTR_SIZE != 0, let attr {
            let size = Int64(attr.pointee.st_size)
            if let staging = stagingFile(fi) {
                do { try staging.truncate(to: size) } catch { return fail(req, "truncate", error, digest) }
            } else if size != digest.size {
                // A committed blob is immutable.
                return replyErr(req, EPERM)
            }
        }
        if toSet & ~(timesOnly | FUSE_SET_ATTR_SIZE) != 0 {
            return replyErr(req, EPERM)
        }
        // Timestamps are fixed; accept and ignore requests to set them.
        var st = fileAttr(digest, file.variant, ino: ino)
        fuse_reply_attr(req, &st, options.attrTimeout)
    }

    // MARK: open / read

    func stagingFile(_ fi: UnsafeMutablePointer<fuse_file_info>?) -> StagingFile? {
        guard let fi, fi.pointee.fh != 0, let p = UnsafeRawPointer(bitPattern: UInt(fi.pointee.fh)) else { return nil }
        return Unmanaged<StagingFile>.fromOpaque(p).takeUnretainedValue()
    }

    func open(_ req: fuse_req_t?, ino: UInt64, fi: UnsafeMutablePointer<fuse_file_info>) {
        counters.opens.add()
        guard let file = inodes.file(ino) else { return replyErr(req, isDirectory(ino) ? EISDIR : isKnown(ino) ? ELOOP : ENOENT) }
        let digest = file.digest
        let accmode = fi.pointee.flags & O_ACCMODE
        if accmode != O_RDONLY {
            guard options.writable else { return replyErr(req, EROFS) }
            // Files of a tree are part of an immutable Directory.
            guard file.variant == nil else { return replyErr(req, EPERM) }
            // Rewriting a blob means replacing it whole (O_TRUNC); changing
            // bytes in place is refused: blobs are immutable.
            guard fi.pointee.flags & O_TRUNC != 0 else { return replyErr(req, EPERM) }
            do {
                let staging = try StagingFile.create(for: digest, in: stagingDirectory)
                fi.pointee.fh = UInt64(UInt(bitPattern: Unmanaged.passRetained(staging).toOpaque()))
                casfs_fi_set_direct_io(fi, 1)
                fuse_reply_open(req, fi)
            } catch {
                fail(req, "open for writing", error, digest)
            }
            return
        }
        if openless {
            // The kernel remembers ENOSYS and serves later opens itself (with keep_cache).
            recordAccess?(digest)
            return replyErr(req, ENOSYS)
        }
        fi.pointee.fh = 0
        casfs_fi_set_keep_cache(fi, 1)
        casfs_fi_set_noflush(fi, 1)
        recordAccess?(digest)
        fuse_reply_open(req, fi)
    }

    func create(_ req: fuse_req_t?, parent: UInt64, name: String, fi: UnsafeMutablePointer<fuse_file_info>) {
        guard options.writable else { return replyErr(req, EROFS) }
        guard parent == FixedInode.sha256 else { return replyErr(req, isDirectory(parent) ? EPERM : ENOTDIR) }
        guard let digest = Digest(parsing: name) else { return replyErr(req, EINVAL) }
        do {
            let staging = try StagingFile.create(for: digest, in: stagingDirectory)
            guard let ino = rememberBlob(digest) else { return replyErr(req, EIO) }
            // Zero timeouts: whether the name exists is decided at close.
            var e = entry(ino: ino, attr: blobAttr(digest, ino: ino), timeout: 0)
            fi.pointee.fh = UInt64(UInt(bitPattern: Unmanaged.passRetained(staging).toOpaque()))
            casfs_fi_set_direct_io(fi, 1)
            if fuse_reply_create(req, &e, fi) != 0 {
                // The kernel did not take the reply (interrupted): undo.
                inodes.forget(ino, 1)
                Unmanaged<StagingFile>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(fi.pointee.fh))!).release()
            }
        } catch {
            fail(req, "create", error, digest)
        }
    }

    func read(_ req: fuse_req_t?, ino: UInt64, size: Int, offset: Int64, fi: UnsafeMutablePointer<fuse_file_info>?) {
        counters.reads.add()
        if let staging = stagingFile(fi) {
            do {
                let data = try staging.read(offset: offset, length: size)
                data.withUnsafeBytes { _ = fuse_reply_buf(req, $0.baseAddress, $0.count) }
            } catch {
                fail(req, "read staging", error, staging.digest)
            }
            return
        }
        guard let digest = inodes.digest(ino) else { return replyErr(req, ENOENT) }
        guard offset < digest.size, size > 0 else { return replyErr(req, 0) }
        let length = Int(min(Int64(size), digest.size - offset))
        do {
            guard let data = try storage.read(digest, offset: offset, length: length) else {
                log.error("read \(digest): blob vanished from the storage")
                counters.errors.add()
                return replyErr(req, EIO)
            }
            counters.readBytes.add(Int64(data.count))
            data.withUnsafeBytes { _ = fuse_reply_buf(req, $0.baseAddress, $0.count) }
        } catch {
            fail(req, "read", error, "\(digest) @\(offset)+\(length)")
        }
    }

    func write(_ req: fuse_req_t?, buf: UnsafeRawBufferPointer, offset: Int64, fi: UnsafeMutablePointer<fuse_file_info>?) {
        guard let staging = stagingFile(fi) else { return replyErr(req, options.writable ? EBADF : EROFS) }
        do {
            let n = try staging.write(buf, at: offset)
            fuse_reply_write(req, n)
        } catch {
            fail(req, "write", error, staging.digest)
        }
    }

    func flush(_ req: fuse_req_t?, fi: UnsafeMutablePointer<fuse_file_info>?) {
        guard let staging = stagingFile(fi) else {
            // Without OPEN the kernel cannot be told FOPEN_NOFLUSH; ENOSYS stops
            // FLUSH for the whole (read-only) mount.
            return replyErr(req, openless ? ENOSYS : 0)
        }
        let rc = finish(staging)
        fuse_reply_err(req, rc)
    }

    func finish(_ staging: StagingFile) -> Int32 {
        staging.finish(storage: storage) { log.error("\($0)") }.result
    }

    func release(_ req: fuse_req_t?, fi: UnsafeMutablePointer<fuse_file_info>?) {
        if let fi, fi.pointee.fh != 0, let p = UnsafeRawPointer(bitPattern: UInt(fi.pointee.fh)) {
            let staging = Unmanaged<StagingFile>.fromOpaque(p).takeRetainedValue()
            fi.pointee.fh = 0
            _ = finish(staging)
        }
        fuse_reply_err(req, 0)
    }

    // MARK: changes

    func unlink(_ req: fuse_req_t?, parent: UInt64, name: String) {
        guard options.writable else { return replyErr(req, EROFS) }
        guard parent == FixedInode.sha256 else { return replyErr(req, isDirectory(parent) ? EPERM : ENOTDIR) }
        guard let digest = Digest(parsing: name) else { return replyErr(req, ENOENT) }
        // The empty blob exists in every store: it cannot be removed.
        if digest.isEmpty { return replyErr(req, EPERM) }
        do {
            guard try storage.hasBlob(digest) else { return replyErr(req, ENOENT) }
            try storage.deleteBlob(digest)
            fuse_reply_err(req, 0)
        } catch {
            fail(req, "unlink", error, digest)
        }
    }

    // MARK: xattrs

    static let checksumXattr = "user.checksum.sha256"
    static let digestXattr = "user.casfs.digest"
    static let statsXattr = "user.casfs.stats"

    func xattrValue(ino: UInt64, name: String) -> [UInt8]? {
        if ino == FixedInode.root {
            return name == Self.statsXattr ? Array(statisticsJSON().utf8) : nil
        }
        if let node = treeNodes.node(ino) {
            // A tree directory's digest is that of its Directory message.
            guard case .directory(let d) = node.kind, name == Self.digestXattr else { return nil }
            return Array(d.description.utf8)
        }
        guard let d = inodes.digest(ino) else { return nil }
        switch name {
        case Self.checksumXattr: return d.rawHash
        case Self.digestXattr: return Array(d.description.utf8)
        default: return nil
        }
    }

    func xattrNames(ino: UInt64) -> [String] {
        if ino == FixedInode.root { return [Self.statsXattr] }
        if inodes.digest(ino) != nil { return [Self.checksumXattr, Self.digestXattr] }
        if let node = treeNodes.node(ino), case .directory = node.kind { return [Self.digestXattr] }
        return []
    }

    func getxattr(_ req: fuse_req_t?, ino: UInt64, name: String, size: Int) {
        guard let value = xattrValue(ino: ino, name: name) else {
            if !isKnown(ino) { return replyErr(req, ENOENT) }
            return replyErr(req, ENODATA)
        }
        replyXattr(req, value, size: size)
    }

    func listxattr(_ req: fuse_req_t?, ino: UInt64, size: Int) {
        var bytes: [UInt8] = []
        for n in xattrNames(ino: ino) { bytes += Array(n.utf8) + [0] }
        replyXattr(req, bytes, size: size)
    }

    func replyXattr(_ req: fuse_req_t?, _ value: [UInt8], size: Int) {
        if size == 0 {
            fuse_reply_xattr(req, value.count)
        } else if size < value.count {
            fuse_reply_err(req, ERANGE)
        } else {
            value.withUnsafeBytes { _ = fuse_reply_buf(req, $0.baseAddress, $0.count) }
        }
    }

    /// Every metric of the mount, as one JSON object (`name{labels}` → value).
    public func statisticsJSON() -> String {
        let snap = metrics.snapshot()
        let body = snap.keys.sorted().map { k -> String in
            let v = snap[k]!
            let num = v == v.rounded() && abs(v) < 1e15 ? String(Int64(v)) : String(v)
            return "\(jsonString(k)):\(num)"
        }.joined(separator: ",")
        return "{\(body)}"
    }

    // MARK: statfs

    func statfs(_ req: fuse_req_t?) {
        var sv = statvfs()
        sv.f_bsize = 4096
        sv.f_frsize = 4096
        sv.f_namemax = 255
        // Blocks: the index's total size used, plus what the staging directory's
        // filesystem has free (new blobs land there first). Files: the blob count.
        var host = statvfs()
        if statvfs(stagingDirectory, &host) == 0 {
            let free = UInt64(host.f_bavail) * UInt64(host.f_frsize) / 4096
            sv.f_bfree = fsblkcnt_t(free)
            sv.f_bavail = fsblkcnt_t(free)
        }
        if let index {
            do {
                // Outside values (a shared Redis's counter): clamped, never trapping.
                let total = try index.totalSize()
                let used = UInt64(total.blocks(of: 4096))
                let (blocks, o) = used.addingReportingOverflow(UInt64(sv.f_bfree))
                sv.f_blocks = fsblkcnt_t(o ? UInt64.max : blocks)
                sv.f_files = fsfilcnt_t(max(0, index.recentBlobCount(maxAge: 30) ?? 0))
            } catch {
                return fail(req, "statfs", error)
            }
        }
        fuse_reply_statfs(req, &sv)
    }

    // MARK: directories

    func opendir(_ req: fuse_req_t?, ino: UInt64, fi: UnsafeMutablePointer<fuse_file_info>) {
        var tree: TreeDirectory?
        if let node = treeNodes.node(ino) {
            guard case .directory(let digest) = node.kind else { return replyErr(req, ENOTDIR) }
            // The listing is read from this snapshot, whatever the cache evicts meanwhile.
            guard let d = loadDirectory(req, digest, op: "opendir") else { return }
            tree = d
            prefetchFiles(digest, d)
            // Immutable: the kernel may keep the listing.
            casfs_fi_set_cache_readdir(fi, 1)
            casfs_fi_set_keep_cache(fi, 1)
        } else if !FixedInode.contains(ino) {
            return replyErr(req, inodes.file(ino) != nil ? ENOTDIR : ENOENT)
        }
        let h = DirectoryHandle(inode: ino, tree: tree)
        fi.pointee.fh = UInt64(UInt(bitPattern: Unmanaged.passRetained(h).toOpaque()))
        if fuse_reply_open(req, fi) != 0 { Unmanaged<DirectoryHandle>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(fi.pointee.fh))!).release() }
    }

    func releasedir(_ req: fuse_req_t?, fi: UnsafeMutablePointer<fuse_file_info>?) {
        if let fi, let p = UnsafeRawPointer(bitPattern: UInt(fi.pointee.fh)) {
            Unmanaged<DirectoryHandle>.fromOpaque(p).release()
            fi.pointee.fh = 0
        }
        fuse_reply_err(req, 0)
    }

    /// Fills one readdir/readdirplus reply.
    func readdir(_ req: fuse_req_t?, ino: UInt64, size: Int, offset: Int64,
                 fi: UnsafeMutablePointer<fuse_file_info>?, plus: Bool) {
        guard let fi, let p = UnsafeRawPointer(bitPattern: UInt(fi.pointee.fh)) else { return replyErr(req, EBADF) }
        let handle = Unmanaged<DirectoryHandle>.fromOpaque(p).takeUnretainedValue()
        let buf = UnsafeMutablePointer<CChar>.allocate(capacity: max(size, 1))
        defer { buf.deallocate() }
        var used = 0

        /// Adds one entry; false when it does not fit. `listed` says what a
        /// readdirplus entry stands for (nil: a fixed directory).
        func add(_ name: String, _ attr: stat, nextOffset: Int64, listed: ListedFile?) -> Bool {
            let room = size - used
            if plus {
                var e = fuse_entry_param()
                var ino = UInt64(attr.st_ino)
                var timeout = ino == FixedInode.sha256 ? options.entryTimeout : 0
                var undo: (() -> Void)?
                switch listed {
                case nil:
                    break
                case .file(let digest, let variant):
                    // readdirplus entries count as lookups: remember before the
                    // kernel can see them, undo if the entry did not fit.
                    guard let i = rememberBlob(digest, variant) else { return true }
                    ino = i
                    timeout = options.entryTimeout
                    undo = { self.inodes.forget(i, 1) }
                case .treeNode(let node):
                    guard let i = treeNodes.remember(node) else { return true }
                    ino = i
                    timeout = options.entryTimeout
                    undo = { self.treeNodes.forget(i, 1) }
                case .unknown:
                    ino = 0  // name and type only: not a lookup
                }
                e = entry(ino: ino, attr: attr, timeout: timeout)
                let need = name.withCString { fuse_add_direntry_plus(req, buf + used, room, $0, &e, off_t(nextOffset)) }
                if need > room {
                    undo?()
                    return false
                }
                used += need
            } else {
                var st = attr
                let need = name.withCString { fuse_add_direntry(req, buf + used, room, $0, &st, off_t(nextOffset)) }
                if need > room { return false }
                used += need
            }
            return true
        }

        if let tree = handle.tree, let node = treeNodes.node(ino) {
            fillTreeListing(req, ino: ino, node: node, tree: tree, offset: offset) { name, st, next, listed in
                add(name, st, nextOffset: next, listed: listed)
            }
            fuse_reply_buf(req, buf, used)
            return
        }

        let parentIno = FixedInode.root
        var pos = ListingPosition(offset: offset)
        fill: while true {
            switch pos {
            case .start:
                guard add(".", dirAttr(ino), nextOffset: 1, listed: nil) else { break fill }
                pos = .afterDot
            case .afterDot:
                let next: ListingPosition = ino == FixedInode.tree ? .end : .entry(cursor: 0, index: 0)
                guard add("..", dirAttr(parentIno), nextOffset: next.offset!, listed: nil) else { break fill }
                pos = next
            case .end:
                break fill
            case .entry(let cursor, let index):
                if ino == FixedInode.root {
                    // sha256, then tree.
                    let names = ["sha256", "tree"]
                    guard index < names.count else { pos = .end; continue }
                    let next: ListingPosition = index + 1 < names.count ? .entry(cursor: 0, index: index + 1) : .end
                    let child = index == 0 ? FixedInode.sha256 : FixedInode.tree
                    guard add(names[index], dirAttr(child), nextOffset: next.offset!, listed: nil) else { break fill }
                    pos = next
                    continue
                }
                guard ino == FixedInode.sha256 else { pos = .end; continue }
                guard let blobIndex = self.index else { pos = .end; continue }
                let page: DirectoryHandle.Page
                do {
                    page = try handle.page(at: cursor, index: blobIndex, count: listPageSize)
                } catch {
                    if used > 0 { break fill }  // return what we have; the error comes next call
                    return fail(req, "readdir", error)
                }
                if index >= page.digests.count {
                    pos = page.next == 0 ? .end : .entry(cursor: page.next, index: 0)
                    continue
                }
                let d = page.digests[index]
                var next: ListingPosition = index + 1 < page.digests.count
                    ? .entry(cursor: cursor, index: index + 1)
                    : (page.next == 0 ? .end : .entry(cursor: page.next, index: 0))
                guard let nextOffset = next.offset else {
                    log.error("readdir: SCAN cursor \(page.next) does not fit in a directory offset")
                    next = .end
                    if used > 0 { break fill }
                    return replyErr(req, EOVERFLOW)
                }
                guard add(d.description, blobAttr(d, ino: blobInode(d)), nextOffset: nextOffset, listed: .file(d, nil)) else { break fill }
                pos = next
            }
        }
        fuse_reply_buf(req, buf, used)
    }
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
