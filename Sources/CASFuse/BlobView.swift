import CASCore
import CASTree
import Foundation
import FuseKernel

/// `/sha256/<hash>_<size>` and every file inode (a tree's files are blob
/// inodes too): lookup, open, read, write, unlink, attributes, xattrs.
extension CASFileSystem {
    func lookupBlob(_ name: FuseName, _ reply: FuseReply) {
        guard let digest = Digest(parsing: name.string) else { return negativeEntry(reply) }
        do {
            guard try storage.hasBlob(digest) else { return negativeEntry(reply) }
            // Open-less: the kernel opens without asking; the lookup is where
            // the daemon sees a blob used.
            if openless { recordAccess?(digest) }
            replyFileEntry(digest, nil, timeout: entryTimeout, reply)
            if reply.delivered { namedInSha256.withLock { _ = $0.insert(blobInode(digest)) } }
        } catch {
            fail(reply, "lookup", error, digest)
        }
    }

    /// Records one more kernel reference; nil (after replying EIO) on an
    /// inode number collision.
    func rememberFile(_ digest: Digest, _ variant: FileVariant?) -> UInt64? {
        switch inodes.remember(digest, variant) {
        case .ok(let ino): return ino
        case .collision(let ino, let other):
            log.error("inode \(ino) collision: \(digest) and \(other)")
            return nil
        }
    }

    func replyFileEntry(_ digest: Digest, _ variant: FileVariant?, timeout: Double, _ reply: FuseReply) {
        guard let ino = rememberFile(digest, variant) else { return reply.error(EIO) }
        reply.entry(entry(ino, fileAttributes(digest, variant, ino: ino), timeout: timeout))
        if !reply.delivered { inodes.forget(ino, 1) }
    }

    // MARK: open / read

    func open(_ h: FuseRequestHeader, flags: UInt32, _ reply: FuseReply) {
        let ino = h.nodeid
        guard let file = inodes.file(ino) else {
            return reply.error(isDirectory(ino) ? EISDIR : isKnown(ino) ? ELOOP : ENOENT)
        }
        let digest = file.digest
        if Int32(bitPattern: flags) & O_ACCMODE != O_RDONLY {
            guard options.writable else { return reply.error(EROFS) }
            // Files of a tree are part of an immutable Directory.
            guard file.variant == nil else { return reply.error(EPERM) }
            return openForWriting(h, digest, ino: ino, truncated: false, openFlags: flags, reply) { fh, flags, backing in
                reply.open(fh: fh, flags: flags, backingID: backing)
            }
        }
        if openless {
            // The kernel remembers ENOSYS and serves later opens itself.
            recordAccess?(digest)
            return reply.error(ENOSYS)
        }
        let source: BlobSource
        do {
            guard let s = try storage.openBlob(digest) else {
                // Gone (cleanup, another mount): through /sha256 the name is
                // gone too (ENOENT, and the kernel's entry dropped); a tree
                // still names it, so there it is an error (EIO).
                if namedInSha256.withLock({ $0.contains(ino) }) {
                    invalidateEntry(parent: FixedInode.sha256, name: digest.description)
                    return reply.error(ENOENT)
                }
                counters.errors.add()
                log.error("open \(digest): the blob is not in the store")
                return reply.error(EIO)
            }
            source = s
        } catch {
            return fail(reply, "open", error, digest, ino: ino)
        }
        recordAccess?(digest)
        // Small blobs are served from the mount's own page cache: setting up
        // a backing file costs more than it saves for them.
        let mode = digest.size >= Self.passthroughMinimumSize ? passthrough.openReader(ino, source) : passthrough.openCached(ino)
        let fh = handles.add(.blob(BlobReadHandle(digest: digest, ino: ino, source: source, mode: mode)))
        switch mode {
        case .passthrough(let id):
            // The kernel allows only direct I/O, no-flush and parallel writes
            // beside passthrough (no keep-cache: it has no page cache of its own).
            reply.open(fh: fh, flags: [.noFlush, .passthrough], backingID: id)
        default:
            reply.open(fh: fh, flags: [.keepCache, .noFlush])
        }
        if !reply.delivered { release(ino, fh: fh, nil) }
    }

    /// Opens a staging file for `digest` and answers with `send(fh, flags, backing)`.
    /// `openFlags`: the flags of the open(2). A read-write open is refused
    /// (EBUSY) while the blob is read through passthrough (see `openWriter`).
    func openForWriting(_ h: FuseRequestHeader, _ digest: Digest, ino: UInt64, truncated: Bool, openFlags: UInt32,
                        _ reply: FuseReply, send: (UInt64, FuseOpenFlags, Int32) -> Void) {
        do {
            let existed = try storage.hasBlob(digest)
            let w = try WriteHandle.open(digest, ino: ino, in: stagingDirectory, existed: existed,
                                         truncated: truncated, opener: h.pid)
            let readable = Int32(bitPattern: openFlags) & O_ACCMODE == O_RDWR
            guard let mode = passthrough.openWriter(ino, readable: readable) else {
                log.info("read-write open of \(digest) refused: it is being read through passthrough")
                return reply.error(EBUSY)
            }
            w.mode = mode
            writers.add(w)
            let fh = handles.add(.write(w))
            // Direct I/O: writes reach the daemon, and override passthrough
            // for this file when it joins an inode's passthrough opens.
            if case .passthrough(let id) = w.mode {
                send(fh, [.directIO, .passthrough], id)
            } else {
                send(fh, [.directIO], 0)
            }
            if !reply.delivered { release(ino, fh: fh, nil) }
        } catch {
            fail(reply, "open for writing", error, digest)
        }
    }

    func read(_ ino: UInt64, fh: UInt64, offset: UInt64, size: UInt32, _ reply: FuseReply) {
        let off = Int64(bitPattern: offset)
        guard off >= 0 else { return reply.error(EINVAL) }
        let source: BlobSource
        let digest: Digest
        switch handles[fh] {
        case .write(let w)?:
            do {
                try reply.data(count: Int(size)) { try w.read(offset: offset, into: $0) }
            } catch {
                fail(reply, "read of a file being written", error, w.digest)
            }
            return
        case .blob(let b)?:
            source = b.source
            digest = b.digest
        case .directory?:
            return reply.error(EISDIR)
        case nil:
            // An open-less open (or a handle the kernel never had).
            guard let d = inodes.digest(ino) else { return reply.error(isDirectory(ino) ? EISDIR : ENOENT) }
            digest = d
            do {
                guard let s = try pinned.source(ino, open: { try storage.openBlob(d) }) else {
                    counters.errors.add()
                    log.error("read \(d): the blob is gone from the storage")
                    invalidateEntry(parent: FixedInode.sha256, name: d.description)
                    return reply.error(EIO)
                }
                source = s
            } catch {
                return fail(reply, "read", error, d, ino: ino)
            }
        }
        guard off < digest.size, size > 0 else { return reply.data(count: 0) { _ in 0 } }
        let count = Int(min(Int64(size), digest.size - off))
        do {
            try reply.data(count: count) { buf in
                let n = try source.read(into: buf, offset: off)
                guard n == buf.count else {
                    throw StorageError.io(errno: EIO, "short read at \(off): \(n) of \(buf.count) bytes")
                }
                return n
            }
            counters.readBytes.add(Int64(count))
        } catch {
            fail(reply, "read", error, "\(digest) @\(off)+\(count)", ino: ino)
        }
    }

    /// Blobs from this size on are handed to the kernel (passthrough).
    static let passthroughMinimumSize: Int64 = 1 << 20

    // MARK: writes

    func create(_ h: FuseRequestHeader, parent: UInt64, name: FuseName, flags: UInt32, _ reply: FuseReply) {
        guard options.writable else { return reply.error(EROFS) }
        guard parent == FixedInode.sha256 else { return reply.error(isDirectory(parent) ? changeErrno : ENOTDIR) }
        // A name that is not <hash>_<size> can never be a blob.
        guard let digest = Digest(parsing: name.string) else { return reply.error(EINVAL) }
        guard let ino = rememberFile(digest, nil) else { return reply.error(EIO) }
        openForWriting(h, digest, ino: ino, truncated: true, openFlags: flags, reply) { fh, flags, backing in
            // Zero timeouts: whether the name exists is decided at close.
            let attrs = fileAttributes(digest, nil, ino: ino, writer: handles.write(fh))
            reply.create(entry(ino, attrs, timeout: 0), fh: fh, flags: flags, backingID: backing)
        }
        if reply.answered != 0 || !reply.delivered { inodes.forget(ino, 1) }
    }

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

    func release(_ ino: UInt64, fh: UInt64, _ reply: FuseReply?) {
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

    /// Only times (ignored) and sizes of files being written change. The
    /// kernel sends the O_TRUNC of an open as a SETATTR without a file handle
    /// right after the OPEN, from the opening thread: for an existing blob
    /// that starts a rewrite, and its size stays what readers see.
    /// `ftruncate` comes with the handle, and `truncate(2)` of a committed
    /// blob without one: EPERM.
    func setattr(_ h: FuseRequestHeader, _ s: FuseSetattr, _ reply: FuseReply) {
        let ino = h.nodeid
        guard let file = inodes.file(ino) else {
            return reply.error(isKnown(ino) ? changeErrno : ENOENT)
        }
        var writer = s.valid.contains(.fh) ? handles.write(s.fh) : nil
        if s.valid.contains(.size) {
            if let writer {
                if let e = writer.truncate(to: s.size) { return reply.error(e.code) }
            } else if !options.writable {
                return reply.error(EROFS)
            } else if let w = writers.all(ino).first(where: { $0.acceptOpenTruncate(size: s.size, thread: h.pid) }) {
                writer = w
            } else if s.size != UInt64(file.digest.size) || file.variant != nil {
                // A committed blob is immutable.
                return reply.error(EPERM)
            }
        }
        let others = s.valid.subtracting(FuseSetattrValid.times).subtracting([.size, .fh, .lockOwner, .killSuidgid])
        if !others.isEmpty {
            log.debug("setattr of \(file.digest) refused: valid 0x\(String(s.valid.rawValue, radix: 16))")
            return reply.error(changeErrno)
        }
        // Timestamps are fixed; requests to set them are accepted and ignored.
        reply.attributes(fileAttributes(file.digest, file.variant, ino: ino, writer: writer), timeout: 0)
    }

    func unlink(parent: UInt64, name: FuseName, _ reply: FuseReply) {
        guard options.writable else { return reply.error(EROFS) }
        guard parent == FixedInode.sha256 else { return reply.error(isDirectory(parent) ? changeErrno : ENOTDIR) }
        guard let digest = Digest(parsing: name.string) else { return reply.error(ENOENT) }
        // The empty blob exists in every store: it cannot be removed.
        if digest.isEmpty { return reply.error(EPERM) }
        do {
            guard try storage.hasBlob(digest) else { return reply.error(ENOENT) }
            try storage.deleteBlob(digest)
            reply.ok()
        } catch {
            fail(reply, "unlink", error, digest)
        }
    }

    func mknod(parent: UInt64, name: FuseName, mode: UInt32, _ reply: FuseReply) {
        guard options.writable else { return reply.error(EROFS) }
        // Regular files are made through create; nodes of other kinds never exist here.
        let regular = mode & UInt32(S_IFMT) == UInt32(S_IFREG)
        reply.error(regular && parent == FixedInode.sha256 && Digest(parsing: name.string) == nil ? EINVAL : EPERM)
    }

    // MARK: xattrs

    static let checksumXattr = "user.checksum.sha256"
    static let digestXattr = "user.casfs.digest"
    static let statsXattr = "user.casfs.stats"
    /// The configuration file the mount serves (absent on a zero-config mount).
    static let configXattr = "user.casfs.config"

    func xattrValue(_ ino: UInt64, name: String) -> [UInt8]? {
        if ino == FixedInode.root {
            if name == Self.configXattr { return options.configPath.map { Array($0.utf8) } }
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

    func xattrNames(_ ino: UInt64) -> [String] {
        if ino == FixedInode.root { return options.configPath == nil ? [Self.statsXattr] : [Self.statsXattr, Self.configXattr] }
        if inodes.digest(ino) != nil { return [Self.checksumXattr, Self.digestXattr] }
        if let node = treeNodes.node(ino), case .directory = node.kind { return [Self.digestXattr] }
        return []
    }

    func getxattr(_ ino: UInt64, name: String, size: Int, _ reply: FuseReply) {
        guard let value = xattrValue(ino, name: name) else {
            return reply.error(isKnown(ino) ? ENODATA : ENOENT)
        }
        replyXattr(value, size: size, reply)
    }

    func listxattr(_ ino: UInt64, size: Int, _ reply: FuseReply) {
        var bytes: [UInt8] = []
        for n in xattrNames(ino) { bytes += Array(n.utf8) + [0] }
        replyXattr(bytes, size: size, reply)
    }

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
