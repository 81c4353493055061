import CASCore
import CASTree
import Foundation
import FuseKernel
import Synchronization

/// A blob: `/sha256/<hash>_<size>`, and every file of a tree (a plain tree
/// file is the blob's own inode and shares its page cache; an executable
/// or a file with node properties is a variant with an inode of its own).
/// Opens, reads, the size of a write under way, xattrs.
final class FileNode: Node {
    let ino: UInt64
    let digest: Digest
    let variant: FileVariant?
    var kind: NodeKind { .file }
    /// Reached by the kernel through `/sha256` (not only through a tree):
    /// found gone later, new opens are ENOENT rather than EIO, and the
    /// kernel's entry in `/sha256` is dropped.
    private let viaSha256 = Atomic<Bool>(false)

    init(_ digest: Digest, _ variant: FileVariant?) {
        self.digest = digest
        self.variant = variant
        self.ino = fileInode(digest, variant)
    }

    var isNamedInSha256: Bool { viaSha256.load(ordering: .relaxed) }
    func markNamedInSha256() { viaSha256.store(true, ordering: .relaxed) }

    func isSame(as other: any Node) -> Bool {
        guard let f = other as? FileNode else { return false }
        return f.digest == digest && f.variant == variant
    }

    func attributes(_ fs: CASFileSystem, writer: WriteHandle?) -> FuseAttributes {
        fs.fileAttributes(digest, variant, ino: ino, writer: writer)
    }

    /// While a write is under way its size changes: not cached.
    func attributeTimeout(_ fs: CASFileSystem) -> Double { fs.writers.active(ino) ? 0 : fs.attrTimeout }

    func forgotten(_ fs: CASFileSystem) { fs.pinned.drop(ino) }

    // MARK: open / read

    func open(_ r: Request, flags: UInt32) {
        let fs = r.fs
        if Int32(bitPattern: flags) & O_ACCMODE != O_RDONLY {
            guard fs.options.writable else { return r.reply.error(EROFS) }
            // Files of a tree are part of an immutable Directory.
            guard variant == nil else { return r.reply.error(EPERM) }
            return openForWriting(r, truncated: false, openFlags: flags) { fh, flags, backing in
                r.reply.open(fh: fh, flags: flags, backingID: backing)
            }
        }
        if fs.openless {
            // The kernel remembers ENOSYS and serves later opens itself.
            fs.recordAccess?(digest)
            return r.reply.error(ENOSYS)
        }
        let source: BlobSource
        do {
            guard let s = try fs.storage.openBlob(digest) else { return gone(r, "open") }
            source = s
        } catch {
            return fs.fail(r.reply, "open", error, digest, ino: ino)
        }
        fs.recordAccess?(digest)
        // Small blobs are served from the mount's own page cache: setting up
        // a backing file costs more than it saves for them.
        let mode = digest.size >= CASFileSystem.passthroughMinimumSize
            ? fs.passthrough.openReader(ino, source) : fs.passthrough.openCached(ino)
        let fh = fs.handles.add(.blob(BlobReadHandle(digest: digest, ino: ino, source: source, mode: mode)))
        switch mode {
        case .passthrough(let id):
            // The kernel allows only direct I/O, no-flush and parallel writes
            // beside passthrough (no keep-cache: it has no page cache of its own).
            r.reply.open(fh: fh, flags: [.noFlush, .passthrough], backingID: id)
        default:
            r.reply.open(fh: fh, flags: [.keepCache, .noFlush])
        }
        if !r.reply.delivered { fs.release(fh: fh, nil) }
    }

    /// The blob is no longer in the storage (cleanup, another mount): through
    /// /sha256 the name is gone too (ENOENT, and the kernel's entry
    /// dropped); a tree still names it, so there it is an error (EIO).
    private func gone(_ r: Request, _ op: String) {
        if isNamedInSha256 {
            r.fs.invalidateEntry(parent: FixedInode.sha256, name: digest.description)
            return r.reply.error(ENOENT)
        }
        r.fs.counters.errors.add()
        folded.error(kind: op, key: digest.description, "\(op) \(digest): the blob is not in the store")
        r.reply.error(EIO)
    }

    /// Opens a staging file for this blob and answers with `send(fh, flags, backing)`.
    /// `openFlags`: the flags of the open(2). A read-write open is refused
    /// (EBUSY) while the blob is read through passthrough (see `openWriter`).
    func openForWriting(_ r: Request, truncated: Bool, openFlags: UInt32,
                        send: (UInt64, FuseOpenFlags, Int32) -> Void) {
        let fs = r.fs
        do {
            let existed = try fs.storage.hasBlob(digest)
            let w = try WriteHandle.open(digest, ino: ino, in: fs.stagingDirectory, existed: existed,
                                         truncated: truncated, opener: r.header.pid)
            let readable = Int32(bitPattern: openFlags) & O_ACCMODE == O_RDWR
            guard let mode = fs.passthrough.openWriter(ino, readable: readable) else {
                folded.log(.info, kind: "read-write open refused", key: digest.description, "read-write open of \(digest) refused: it is being read through passthrough")
                return r.reply.error(EBUSY)
            }
            w.mode = mode
            fs.writers.add(w)
            let fh = fs.handles.add(.write(w))
            // Direct I/O: writes reach the daemon, and override passthrough
            // for this file when it joins an inode's passthrough opens.
            if case .passthrough(let id) = w.mode {
                send(fh, [.directIO, .passthrough], id)
            } else {
                send(fh, [.directIO], 0)
            }
            if !r.reply.delivered { fs.release(fh: fh, nil) }
        } catch {
            fs.fail(r.reply, "open for writing", error, digest)
        }
    }

    /// A read of an open-less open: the blob is held from the first read
    /// until the kernel forgets the inode (a deleted blob stays readable).
    func read(_ r: Request, offset: Int64, size: UInt32) {
        let fs = r.fs
        fs.feeder?.readArrived(ino)
        let source: BlobSource
        do {
            guard let s = try fs.pinned.source(ino, open: { try fs.storage.openBlob(digest) }) else {
                return gone(r, "read")
            }
            source = s
        } catch {
            return fs.fail(r.reply, "read", error, digest, ino: ino)
        }
        fs.serveRead(r, source, digest, offset: offset, size: size)
    }

    /// Only times (ignored) and sizes of files being written change. The
    /// kernel sends the O_TRUNC of an open as a SETATTR without a file handle
    /// right after the OPEN, from the opening thread: for an existing blob
    /// that starts a rewrite, and its size stays what readers see.
    /// `ftruncate` comes with the handle, and `truncate(2)` of a committed
    /// blob without one: EPERM.
    func setattr(_ r: Request, _ s: FuseSetattr) {
        let fs = r.fs
        var writer = s.valid.contains(.fh) ? fs.handles.write(s.fh) : nil
        if s.valid.contains(.size) {
            if let writer {
                if let e = writer.truncate(to: s.size) { return r.reply.error(e.code) }
            } else if !fs.options.writable {
                return r.reply.error(EROFS)
            } else if let w = fs.writers.all(ino).first(where: { $0.acceptOpenTruncate(size: s.size, thread: r.header.pid) }) {
                writer = w
            } else if s.size != UInt64(digest.size) || variant != nil {
                // A committed blob is immutable.
                return r.reply.error(EPERM)
            }
        }
        let others = s.valid.subtracting(FuseSetattrValid.times).subtracting([.size, .fh, .lockOwner, .killSuidgid])
        if !others.isEmpty {
            log.debug("setattr of \(digest) refused: valid 0x\(String(s.valid.rawValue, radix: 16))")
            return r.reply.error(fs.changeErrno)
        }
        // Timestamps are fixed; requests to set them are accepted and ignored.
        r.reply.attributes(attributes(fs, writer: writer), timeout: 0)
    }

    // MARK: xattrs

    func xattr(_ fs: CASFileSystem, name: String) -> [UInt8]? {
        switch name {
        case CASFileSystem.checksumXattr: return digest.rawHash
        case CASFileSystem.digestXattr: return Array(digest.description.utf8)
        default: return nil
        }
    }

    func xattrNames(_ fs: CASFileSystem) -> [String] { [CASFileSystem.checksumXattr, CASFileSystem.digestXattr] }
}

extension CASFileSystem {
    /// Records one more kernel reference to the file node of `digest`
    /// (`variant`); nil (logged) on an inode number collision.
    func rememberFile(_ digest: Digest, _ variant: FileVariant?) -> FileNode? {
        switch nodes.remember(FileNode(digest, variant)) {
        case .node(let n as FileNode): return n
        case .node, .collision:
            folded.error(kind: "inode collision", key: digest.description,
                         "inode \(fileInode(digest, variant)) collision: \(digest) and another node")
            counters.errors.add()
            return nil
        }
    }

    /// Answers a LOOKUP with the file node of `digest`. A small blob's bytes
    /// (`source` if at hand) follow into the page cache on open-less mounts.
    func replyFileEntry(_ digest: Digest, _ variant: FileVariant?, timeout: Double, _ reply: FuseReply,
                        namedInSha256: Bool = false, source: BlobSource? = nil) {
        guard let node = rememberFile(digest, variant) else { return reply.error(EIO) }
        // A small blob the lookup opened: its bytes are held for the READ
        // that follows (no second open). Pushing them into the page cache
        // instead loses the race against the reader nearly every time: the
        // kernel creates the inode only when the reader takes this reply,
        // and reads at once (see PageCacheFeeder).
        if let source, source.size <= Self.smallBlobSize, let data = try? source.readAll(), Int64(data.count) == digest.size {
            pinned.hold(node.ino, DataSource(data, verified: source.isVerified))
        }
        reply.entry(node.entry(self, timeout: timeout))
        if !reply.delivered {
            forgetNode(node.ino, 1)
        } else if namedInSha256 {
            node.markNamedInSha256()
        }
    }

    /// Serves a READ of `count` bytes at `offset` from `source`.
    func serveRead(_ r: Request, _ source: BlobSource, _ digest: Digest, offset off: Int64, size: UInt32) {
        guard off < digest.size, size > 0 else { return r.reply.data(count: 0) { _ in 0 } }
        let count = Int(min(Int64(size), digest.size - off))
        do {
            try r.reply.data(count: count) { buf in
                let n = try source.read(into: buf, offset: off)
                guard n == buf.count else {
                    throw StorageError.io(errno: EIO, "short read at \(off): \(n) of \(buf.count) bytes")
                }
                return n
            }
            counters.readBytes.add(Int64(count))
        } catch {
            fail(r.reply, "read", error, "\(digest) @\(off)+\(count)", ino: r.header.nodeid)
        }
    }

    /// A READ: through the handle of an OPEN, or (open-less) the node's own.
    func read(_ r: Request, fh: UInt64, offset: UInt64, size: UInt32) {
        let off = Int64(bitPattern: offset)
        guard off >= 0 else { return r.reply.error(EINVAL) }
        switch handles[fh] {
        case .write(let w)?:
            do {
                try r.reply.data(count: Int(size)) { try w.read(offset: offset, into: $0) }
            } catch {
                fail(r.reply, "read of a file being written", error, w.digest)
            }
        case .blob(let b)?:
            serveRead(r, b.source, b.digest, offset: off, size: size)
        case .directory?:
            r.reply.error(EISDIR)
        case nil:
            // An open-less open (or a handle the kernel never had).
            guard let node = nodes[r.header.nodeid] ?? fixedNode(r.header.nodeid) else { return r.reply.error(ENOENT) }
            node.read(r, offset: off, size: size)
        }
    }

    // MARK: handles

    func write(_ h: FuseRequestHeader, fh: UInt64, offset: UInt64, data: UnsafeRawBufferPointer, _ reply: FuseReply) {
        guard let w = handles.write(fh) else { return reply.error(options.writable ? EBADF : EROFS) }
        switch w.write(offset: offset, data, pid: h.pid) {
        case .success(let n):
            counters.writeBytes.add(Int64(n))
            reply.written(UInt32(n))
        case .failure(let e):
            reply.error(e.code)
        }
    }

    func flush(_ h: FuseRequestHeader, fh: UInt64, _ reply: FuseReply) {
        // Files the kernel opened itself cannot be told "no flush": ENOSYS
        // stops FLUSH for the whole (read-only, open-less) connection.
        guard let w = handles.write(fh) else { return reply.error(openless ? ENOSYS : 0) }
        reply.error(w.flush(storage, closer: h.pid, holders: ProcessHolders()))
    }

    func fsync(fh: UInt64, _ reply: FuseReply) {
        guard let w = handles.write(fh) else { return reply.ok() }
        reply.error(w.fsync(storage))
    }

    func release(fh: UInt64, _ reply: FuseReply?) {
        switch handles.remove(fh) {
        case .blob(let b)?:
            passthrough.release(b.ino, b.mode)
        case .write(let w)?:
            w.release(storage)
            writers.remove(w)
            passthrough.release(w.ino, w.mode)
        default:
            break
        }
        reply?.ok()
    }

    /// Blobs from this size on are handed to the kernel (passthrough).
    static let passthroughMinimumSize: Int64 = 1 << 20
    /// Blobs up to this size are opened (and held) by a lookup on an
    /// open-less mount, and pushed into the page cache after a listing.
    static let smallBlobSize: Int64 = 64 << 10
}
