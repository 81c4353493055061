import CASCore
import CASTree
import Foundation
import FuseKernel

/// The root (`sha256/`, `tree/`) and directory listings: the fixed
/// directories here, `/sha256` from the index page by page, trees in
/// `TreeView.swift`.
extension CASFileSystem {
    func lookupRoot(_ name: FuseName, _ reply: FuseReply) {
        let ino: UInt64
        if name.equals("sha256") {
            ino = FixedInode.sha256
        } else if name.equals("tree") {
            ino = FixedInode.tree
        } else {
            return negativeEntry(reply)
        }
        reply.entry(entry(ino, dirAttributes(ino), timeout: options.entryTimeout))
    }

    func opendir(_ ino: UInt64, _ reply: FuseReply) {
        guard isDirectory(ino) else { return reply.error(isKnown(ino) ? ENOTDIR : ENOENT) }
        if openless {
            // The kernel opens directories itself from now on and keeps their
            // listings (trees never change; /sha256 is re-read as its mtime moves).
            return reply.error(ENOSYS)
        }
        var tree: TreeDirectory?
        var flags: FuseOpenFlags = []
        if let node = treeNodes.node(ino), case .directory(let digest) = node.kind {
            // The listing is read from this snapshot, whatever the cache evicts meanwhile.
            guard let d = loadDirectory(digest, op: "opendir", reply) else { return }
            tree = d
            prefetchFiles(digest, d)
            // Immutable: the kernel may keep the listing.
            flags = [.cacheDir, .keepCache]
        }
        let fh = handles.add(.directory(DirectoryHandle(inode: ino, tree: tree)))
        reply.open(fh: fh, flags: flags)
        if !reply.delivered { handles.remove(fh) }
    }

    /// Fills one READDIR(PLUS) reply.
    func readdir(_ ino: UInt64, fh: UInt64, offset: UInt64, size: Int, plus: Bool, _ reply: FuseReply) {
        var handle: DirectoryHandle?
        if case .directory(let h)? = handles[fh] { handle = h }
        if let node = treeNodes.node(ino) {
            guard case .directory(let digest) = node.kind else { return reply.error(ENOTDIR) }
            let tree: TreeDirectory
            if let t = handle?.tree {
                tree = t
            } else {
                guard let t = loadDirectory(digest, op: "readdir", reply) else { return }
                if offset == 0 { prefetchFiles(digest, t) }
                tree = t
            }
            return treeListing(ino, node, tree, offset: offset, size: size, plus: plus, reply)
        }
        guard FixedInode.contains(ino) else { return reply.error(isKnown(ino) ? ENOTDIR : ENOENT) }
        var listError: Error?
        var added = [UInt64]()  // inodes remembered for readdirplus entries
        reply.directory(size: size) { filler in
            var pos = ListingPosition(offset: Int64(bitPattern: offset))
            fill: while true {
                switch pos {
                case .start:
                    guard add(&filler, ".", dirAttributes(ino), next: 1, plus: plus, remember: nil) else { break fill }
                    pos = .afterDot
                case .afterDot:
                    let next: ListingPosition = ino == FixedInode.tree ? .end : .entry(cursor: 0, index: 0)
                    guard add(&filler, "..", dirAttributes(FixedInode.root), next: next.offset!, plus: plus, remember: nil) else { break fill }
                    pos = next
                case .end:
                    break fill
                case .entry(let cursor, let i):
                    if ino == FixedInode.root {
                        let names = ["sha256", "tree"]
                        guard i < names.count else { pos = .end; continue }
                        let next: ListingPosition = i + 1 < names.count ? .entry(cursor: 0, index: i + 1) : .end
                        let child = i == 0 ? FixedInode.sha256 : FixedInode.tree
                        guard add(&filler, names[i], dirAttributes(child), next: next.offset!, plus: plus, remember: child,
                                  timeout: options.entryTimeout) else { break fill }
                        pos = next
                        continue
                    }
                    guard ino == FixedInode.sha256, let index else { pos = .end; continue }
                    let page: DirectoryHandle.Page
                    do {
                        if let handle {
                            page = try handle.page(at: cursor, index: index, count: listPageSize)
                        } else {
                            page = try listingPages.page(at: cursor, fresh: offset <= 2 && cursor == 0, index: index, count: listPageSize)
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
                        log.error("readdir: SCAN cursor \(page.next) does not fit in a directory offset")
                        break fill
                    }
                    var remembered: UInt64?
                    if plus {
                        guard let r = rememberFile(d, nil) else { pos = next; continue }
                        remembered = r
                    }
                    let attrs = fileAttributes(d, nil, ino: remembered ?? blobInode(d))
                    guard add(&filler, d.description, attrs, next: nextOffset, plus: plus, remember: remembered) else {
                        if let r = remembered { inodes.forget(r, 1) }
                        break fill
                    }
                    if let r = remembered { added.append(r) }
                    pos = next
                }
            }
            return listError.map { StorageError.wrap($0).errno } ?? 0
        }
        if !reply.delivered {
            for r in added { inodes.forget(r, 1) }
        } else if !added.isEmpty {
            // Reached through /sha256 as by a lookup: found gone later, ENOENT.
            namedInSha256.withLock { $0.formUnion(added) }
        }
        if let listError {
            log.error("readdir: \(listError)")
            counters.errors.add()
        }
    }

    /// One entry; false when it does not fit. `remember`: the inode the
    /// kernel will count as looked up (readdirplus), nil for name and type only.
    func add(_ filler: inout DirectoryFiller, _ name: String, _ attrs: FuseAttributes, next: Int64, plus: Bool,
             remember: UInt64?, timeout: Double? = nil) -> Bool {
        let type = FuseFileType(rawValue: attrs.mode & UInt32(S_IFMT)) ?? .regular
        return Array(name.utf8).withUnsafeBytes { n in
            if plus {
                var e = entry(remember ?? 0, attrs, timeout: remember == nil ? 0 : (timeout ?? entryTimeout))
                e.attributes.ino = attrs.ino
                return filler.add(name: n, entry: e, type: type, nextOffset: UInt64(next))
            }
            return filler.add(name: n, ino: attrs.ino, type: type, nextOffset: UInt64(next))
        }
    }
}
