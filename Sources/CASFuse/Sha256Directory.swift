import CASCore
import FuseKernel
import Glibc

/// `/sha256`: every blob of the store by `<hash>_<size>`. Lookups ask the
/// storage whether the blob is there; the listing comes from the index,
/// page by page; a writable mount creates (writes) and unlinks blobs here.
final class Sha256Directory: Node {
    let ino = FixedInode.sha256
    let kind = NodeKind.directory

    func attributes(_ fs: CASFileSystem, writer: WriteHandle?) -> FuseAttributes { fs.fixedDirectoryAttributes(ino) }
    /// The listing changes as blobs come and go (see `listingTimeout`).
    func attributeTimeout(_ fs: CASFileSystem) -> Double { fs.listingTimeout }

    func lookup(_ r: Request, _ name: FuseName) {
        let fs = r.fs
        guard let digest = Digest(parsing: name.string) else { return fs.negativeEntry(r.reply) }
        do {
            // On an open-less mount a looked-up blob is about to be read: a
            // small one is opened (which tells whether it is there, without
            // asking the index) and held for the READ.
            var source: BlobSource?
            if fs.openless && digest.size <= CASFileSystem.smallBlobSize {
                do {
                    source = try fs.storage.openBlob(digest)
                } catch StorageError.corrupt {
                    // Logged and removed from the store by the check: gone.
                    return fs.negativeEntry(r.reply)
                }
                guard source != nil else { return fs.negativeEntry(r.reply) }
            } else {
                guard try fs.storage.hasBlob(digest) else { return fs.negativeEntry(r.reply) }
            }
            // Open-less: the kernel opens without asking; the lookup is where
            // the daemon sees a blob used.
            if fs.openless { fs.recordAccess?(digest) }
            fs.replyFileEntry(digest, nil, timeout: fs.entryTimeout, r.reply, namedInSha256: true, source: source)
        } catch {
            fs.fail(r.reply, "lookup", error, digest)
        }
    }

    func opendir(_ r: Request) {
        if r.fs.openless { return r.reply.error(ENOSYS) }
        let fh = r.fs.handles.add(.directory(DirectoryHandle(inode: ino)))
        r.reply.open(fh: fh, flags: [])
        if !r.reply.delivered { r.fs.handles.remove(fh) }
    }

    /// Offsets name the position of the next entry (see `ListingPosition`):
    /// ".", "..", then the index's pages by SCAN cursor.
    func readdir(_ r: Request, fh: UInt64, offset: UInt64, size: Int, plus: Bool) {
        let fs = r.fs
        var handle: DirectoryHandle?
        if case .directory(let h)? = fs.handles[fh] { handle = h }
        var listError: Error?
        var added: [FileNode] = []  // nodes the kernel counts as looked up (readdirplus)
        r.reply.directory(size: size) { filler in
            var pos = ListingPosition(offset: Int64(bitPattern: offset))
            fill: while true {
                switch pos {
                case .start:
                    guard fs.addListed(&filler, ".", attributes(fs, writer: nil), next: 1, plus: plus, entry: nil) else { break fill }
                    pos = .afterDot
                case .afterDot:
                    let next = ListingPosition.entry(cursor: 0, index: 0)
                    guard fs.addListed(&filler, "..", fs.fixedDirectoryAttributes(FixedInode.root), next: UInt64(next.offset!),
                                       plus: plus, entry: nil) else { break fill }
                    pos = next
                case .end:
                    break fill
                case .entry(let cursor, let i):
                    guard let index = fs.index else { pos = .end; continue }
                    let page: DirectoryHandle.Page
                    do {
                        if let handle {
                            page = try handle.page(at: cursor, index: index, count: fs.listPageSize)
                        } else {
                            page = try fs.listingPages.page(at: cursor, fresh: offset <= 2 && cursor == 0, index: index,
                                                            count: fs.listPageSize)
                        }
                    } catch {
                        listError = error
                        break fill
                    }
                    if i >= page.digests.count {
                        pos = page.next == 0 ? .end : .entry(cursor: page.next, index: 0)
                        continue
                    }
                    let d = page.digests[i]
                    let next: ListingPosition = i + 1 < page.digests.count
                        ? .entry(cursor: cursor, index: i + 1)
                        : (page.next == 0 ? .end : .entry(cursor: page.next, index: 0))
                    guard let nextOffset = next.offset else {
                        folded.error(kind: "readdir", key: "cursor",
                                     "readdir: SCAN cursor \(page.next) does not fit in a directory offset")
                        break fill
                    }
                    var node: FileNode?
                    if plus {
                        guard let n = fs.rememberFile(d, nil) else { pos = next; continue }
                        node = n
                    }
                    let attrs = node?.attributes(fs, writer: nil) ?? fs.fileAttributes(d, nil, ino: blobInode(d))
                    guard fs.addListed(&filler, d.description, attrs, next: UInt64(nextOffset), plus: plus,
                                       entry: node?.entry(fs, timeout: fs.entryTimeout)) else {
                        if let node { fs.nodes.forget(node.ino, 1) }
                        break fill
                    }
                    if let node { added.append(node) }
                    pos = next
                }
            }
            return listError.map { StorageError.wrap($0).errno } ?? 0
        }
        if !r.reply.delivered {
            for n in added { fs.forgetNode(n.ino, 1) }
        } else {
            // Reached through /sha256 as by a lookup: found gone later, ENOENT.
            for n in added { n.markNamedInSha256() }
        }
        if let listError {
            folded.error(kind: "readdir", key: "\(listError)", "readdir: \(listError)")
            fs.counters.errors.add()
        }
    }

    func create(_ r: Request, name: FuseName, flags: UInt32) {
        let fs = r.fs
        guard fs.options.writable else { return r.reply.error(EROFS) }
        // A name that is not <hash>_<size> can never be a blob.
        guard let digest = Digest(parsing: name.string) else { return r.reply.error(EINVAL) }
        guard let node = fs.rememberFile(digest, nil) else { return r.reply.error(EIO) }
        node.openForWriting(r, truncated: true, openFlags: flags) { fh, flags, backing in
            // Zero timeouts: whether the name exists is decided at close.
            let attrs = node.attributes(fs, writer: fs.handles.write(fh))
            r.reply.create(FuseEntry(nodeid: node.ino, entryTimeout: 0, attrTimeout: 0, attributes: attrs),
                           fh: fh, flags: flags, backingID: backing)
        }
        if r.reply.answered != 0 || !r.reply.delivered { fs.forgetNode(node.ino, 1) }
    }

    func unlink(_ r: Request, name: FuseName) {
        let fs = r.fs
        guard fs.options.writable else { return r.reply.error(EROFS) }
        guard let digest = Digest(parsing: name.string) else { return r.reply.error(ENOENT) }
        // The empty blob exists in every store: it cannot be removed.
        if digest.isEmpty { return r.reply.error(EPERM) }
        do {
            guard try fs.storage.hasBlob(digest) else { return r.reply.error(ENOENT) }
            try fs.storage.deleteBlob(digest)
            r.reply.ok()
        } catch {
            fs.fail(r.reply, "unlink", error, digest)
        }
    }

    func mknod(_ r: Request, name: FuseName, mode: UInt32) {
        guard r.fs.options.writable else { return r.reply.error(EROFS) }
        // Regular files are made through create; nodes of other kinds never exist here.
        let regular = mode & UInt32(S_IFMT) == UInt32(S_IFREG)
        r.reply.error(regular && Digest(parsing: name.string) == nil ? EINVAL : EPERM)
    }

    func isSame(as other: any Node) -> Bool { other === self }
}
