import CASCore
import CASTree
import Foundation
import FuseKernel
import Synchronization

/// `/tree/<hash>_<size>/…`: REAPI Directory blobs shown as read-only trees.
/// A directory of a tree (its root too) is a `TreeDirectoryNode`, a symlink
/// a `SymlinkNode`, a file the blob's `FileNode`. Directory and symlink
/// nodes get an inode per path (parent inode + name), never per digest: the
/// same subtree can appear at several places, and the kernel cannot give one
/// directory inode two parents. Directory blobs are loaded (and checked) on
/// first use; files are read through the same path as `/sha256`.
final class TreeDirectoryNode: Node {
    let ino: UInt64
    let parent: UInt64
    let name: [UInt8]
    let digest: Digest
    let mode: UInt32
    let mtime: TreeTime?
    let nlink: Int
    var kind: NodeKind { .directory }
    /// Its Directory, parsed: held as long as the kernel holds the node, so
    /// that the lookups of its children never load it again, however big
    /// it is against the tree cache (the kernel holds a directory while it
    /// holds any of its children).
    let directory: TreeDirectory
    /// When its files' access times were last refreshed (uptime seconds; 0: never).
    private let refreshed = Atomic<UInt64>(0)

    init(parent: UInt64, name: [UInt8], digest: Digest, _ d: TreeDirectory, fs: CASFileSystem) {
        self.parent = parent
        self.name = name
        self.digest = digest
        self.directory = d
        self.ino = treeNodeInode(parent: parent, name: name)
        mode = d.properties.mode ?? fs.options.treeDirectoryMode ?? 0o555
        mtime = d.properties.mtime
        nlink = 2 + d.subdirectoryCount
    }

    func isSame(as other: any Node) -> Bool {
        guard let o = other as? TreeDirectoryNode else { return false }
        return o.parent == parent && o.name == name && o.digest == digest
    }

    func attributes(_ fs: CASFileSystem, writer: WriteHandle?) -> FuseAttributes {
        var a = FuseAttributes(ino: ino, mode: FuseFileType.directory.rawValue | mode)
        a.size = 4096
        fs.fillTreeAttributes(&a, nlink: nlink, mtime: mtime)
        return a
    }

    /// The Directory (held since the node was made).
    func directory(_ r: Request, op: String) -> TreeDirectory? { directory }

    /// The kernel was handed this directory (a lookup, a listing): the
    /// access times of its files are refreshed together, at most once per
    /// `openlessEntryTimeout`, which is as long as the kernel keeps the
    /// directory's entry on an open-less mount. Its files' own entries can
    /// then live as long as the mount allows: nothing needs their lookups.
    func handedOut(_ fs: CASFileSystem, _ d: TreeDirectory) {
        guard let record = fs.recordAccess else { return }
        let now = UInt64(DispatchTime.now().uptimeNanoseconds / 1_000_000_000) + 1
        let last = refreshed.load(ordering: .relaxed)
        guard last == 0 || now &- last >= UInt64(CASFileSystem.openlessEntryTimeout),
              refreshed.compareExchange(expected: last, desired: now, ordering: .relaxed).exchanged else { return }
        let entries = d.entries
        for i in entries.indices where entries.isFile(i) {
            if let f = entries.digest(at: i) { record(f) }
        }
    }

    func lookup(_ r: Request, _ name: FuseName) {
        let fs = r.fs
        guard let dir = directory(r, op: "lookup") else { return }
        fs.prefetchFiles(digest, dir)
        guard let child = dir.entry(named: name.bytes) else {
            // The tree is immutable: the name will never appear.
            return r.reply.entry(.negative(timeout: CASFileSystem.forever))
        }
        switch child.kind {
        case .file(let digest, let executable):
            // Its access time is refreshed with its directory's (`handedOut`).
            fs.replyFileEntry(digest, FileVariant(executable: executable, properties: child.properties),
                              timeout: fs.options.entryTimeout, r.reply)
        case .directory(let digest):
            guard let sub = fs.loadDirectory(digest, op: "lookup", r.reply) else { return }
            fs.replyTreeDirectory(TreeDirectoryNode(parent: ino, name: name.array, digest: digest, sub, fs: fs), sub, r.reply)
        case .symlink(let target):
            fs.replyTreeNode(SymlinkNode(parent: ino, name: name.array, target: target, mtime: child.properties.mtime),
                             r.reply)
        }
    }

    func opendir(_ r: Request) {
        if r.fs.openless { return r.reply.error(ENOSYS) }
        // The listing is read from this snapshot, whatever the cache evicts meanwhile.
        guard let d = directory(r, op: "opendir") else { return }
        r.fs.prefetchFiles(digest, d)
        let fh = r.fs.handles.add(.directory(DirectoryHandle(inode: ino, tree: d)))
        // Immutable: the kernel may keep the listing.
        r.reply.open(fh: fh, flags: [.cacheDir, .keepCache])
        if !r.reply.delivered { r.fs.handles.remove(fh) }
    }

    /// Offsets: 1 after ".", 2 after "..", then 3 + the index of the entry.
    func readdir(_ r: Request, fh: UInt64, offset: UInt64, size: Int, plus: Bool) {
        let fs = r.fs
        let tree: TreeDirectory
        if case .directory(let h)? = fs.handles[fh], let t = h.tree {
            tree = t
        } else {
            guard let t = directory(r, op: "readdir") else { return }
            if offset == 0 { fs.prefetchFiles(digest, t) }
            tree = t
        }
        var remembered: [any Node] = []
        r.reply.directory(size: size) { filler in
            var pos = offset
            if pos == 0 {
                guard fs.addListed(&filler, ".", attributes(fs, writer: nil), next: 1, plus: plus, entry: nil) else { return 0 }
                pos = 1
            }
            if pos == 1 {
                var up = (fs.nodes[parent] ?? fs.fixedNode(parent))?.attributes(fs, writer: nil)
                    ?? fs.fixedDirectoryAttributes(FixedInode.tree)
                up.ino = parent
                guard fs.addListed(&filler, "..", up, next: 2, plus: plus, entry: nil) else { return 0 }
                pos = 2
            }
            guard pos >= 2, pos - 2 < UInt64(tree.entries.count) else { return 0 }
            var i = Int(pos - 2)
            while i < tree.entries.count {
                let child = tree.entries[i]
                var attrs: FuseAttributes
                var node: (any Node)?
                switch child.kind {
                case .file(let digest, let executable):
                    let variant = FileVariant(executable: executable, properties: child.properties)
                    if plus { node = fs.rememberFile(digest, variant) }
                    attrs = fs.fileAttributes(digest, variant, ino: fileInode(digest, variant))
                case .directory(let digest):
                    // Attributes need the child's own Directory (fetched with the
                    // directory's first use, in bulk). One that cannot be loaded
                    // is listed by name only: its lookup reports why.
                    attrs = FuseAttributes(ino: treeNodeInode(parent: ino, name: child.nameBytes),
                                           mode: FuseFileType.directory.rawValue | 0o555)
                    if plus, case .directory(let sub)? = try? fs.directories.load(digest) {
                        let dirNode = TreeDirectoryNode(parent: ino, name: child.nameBytes, digest: digest, sub, fs: fs)
                        if let n = fs.rememberTreeNode(dirNode) {
                            (n as? TreeDirectoryNode)?.handedOut(fs, sub)
                            node = n
                            attrs = n.attributes(fs, writer: nil)
                        }
                    }
                case .symlink(let target):
                    let link = SymlinkNode(parent: ino, name: child.nameBytes, target: target, mtime: child.properties.mtime)
                    attrs = link.attributes(fs, writer: nil)
                    if plus { node = fs.rememberTreeNode(link) }
                }
                let timeout = node?.kind == .file ? fs.options.entryTimeout : fs.treeEntryTimeout
                guard fs.addListed(&filler, child.name, attrs, next: UInt64(i + 3), plus: plus,
                                   entry: node?.entry(fs, timeout: timeout)) else {
                    if let node { fs.forgetNode(node.ino, 1) }
                    return 0
                }
                if let node { remembered.append(node) }
                i += 1
            }
            return 0
        }
        if !r.reply.delivered {
            for n in remembered { fs.forgetNode(n.ino, 1) }
        } else if let feeder = fs.feeder {
            // A walk reads what it lists: the small files follow into the page cache.
            feeder.offer(remembered.compactMap { n in (n as? FileNode).map { .init(ino: $0.ino, digest: $0.digest) } },
                         directory: ino)
        }
    }

    /// A tree directory's digest is that of its Directory message.
    func xattr(_ fs: CASFileSystem, name: String) -> [UInt8]? {
        name == CASFileSystem.digestXattr ? Array(digest.description.utf8) : nil
    }

    func xattrNames(_ fs: CASFileSystem) -> [String] { [CASFileSystem.digestXattr] }
}

/// A symlink of a tree: its target is returned as text and resolved by the
/// kernel, from the reader's view; the daemon never follows one.
final class SymlinkNode: Node {
    let ino: UInt64
    let parent: UInt64
    let name: [UInt8]
    let target: String
    let mtime: TreeTime?
    var kind: NodeKind { .symlink }

    init(parent: UInt64, name: [UInt8], target: String, mtime: TreeTime?) {
        self.parent = parent
        self.name = name
        self.target = target
        self.mtime = mtime
        self.ino = treeNodeInode(parent: parent, name: name)
    }

    func isSame(as other: any Node) -> Bool {
        guard let o = other as? SymlinkNode else { return false }
        return o.parent == parent && o.name == name && o.target == target && o.mtime == mtime
    }

    func attributes(_ fs: CASFileSystem, writer: WriteHandle?) -> FuseAttributes {
        var a = FuseAttributes(ino: ino, mode: FuseFileType.symlink.rawValue | 0o777)
        a.size = UInt64(target.utf8.count)
        fs.fillTreeAttributes(&a, nlink: 1, mtime: mtime)
        return a
    }

    func readlink(_ r: Request) { r.reply.bytes(Array(target.utf8)) }
}

extension CASFileSystem {
    /// Loads a Directory; nil after answering with the error (or a negative
    /// entry for an absent one).
    func loadDirectory(_ digest: Digest, op: String, _ reply: FuseReply) -> TreeDirectory? {
        do {
            switch try directories.load(digest) {
            case .directory(let d):
                // A tree in use keeps its Directory blobs fresh in the index.
                recordAccess?(digest)
                return d
            case .absent:
                if reply.opcode == FuseOpcode.lookup.rawValue { negativeEntry(reply) } else { reply.error(ENOENT) }
                return nil
            case .invalid(let e):
                counters.errors.add()
                folded.error(kind: "tree", key: digest.description, "\(op): tree \(digest): \(e)")
                reply.error(EIO)
                return nil
            }
        } catch {
            fail(reply, op, error, "tree \(digest)")
            return nil
        }
    }

    /// Records one more kernel reference to a directory or symlink of a
    /// tree; nil (logged) on an inode number collision.
    func rememberTreeNode(_ node: any Node) -> (any Node)? {
        switch nodes.remember(node) {
        case .node(let n): return n
        case .collision:
            folded.error(kind: "inode collision", key: "\(node.ino)", "tree inode collision at inode \(node.ino)")
            counters.errors.add()
            return nil
        }
    }

    func replyTreeNode(_ node: any Node, _ reply: FuseReply) {
        guard let n = rememberTreeNode(node) else { return reply.error(EIO) }
        reply.entry(n.entry(self, timeout: treeEntryTimeout))
        if !reply.delivered { forgetNode(n.ino, 1) }
    }

    /// Answers a LOOKUP with a directory of a tree (`d` its Directory).
    func replyTreeDirectory(_ node: TreeDirectoryNode, _ d: TreeDirectory, _ reply: FuseReply) {
        guard let n = rememberTreeNode(node) else { return reply.error(EIO) }
        reply.entry(n.entry(self, timeout: treeEntryTimeout))
        if !reply.delivered { return forgetNode(n.ino, 1) }
        (n as? TreeDirectoryNode)?.handedOut(self, d)
    }

    /// How long the kernel keeps the entry of a directory or symlink of a
    /// tree: on an open-less mount as long as a blob's (the lookups that
    /// come back refresh the access times of the directory's files).
    var treeEntryTimeout: Double { entryTimeout }

    /// The first time a directory of a tree is used, its files are likely to
    /// be read and its subdirectories listed: let the storage fetch the small
    /// ones, and the subdirectories' Directory blobs, in bulk.
    func prefetchFiles(_ digest: Digest, _ dir: TreeDirectory) {
        guard options.treePrefetch, directories.firstUse(digest) else { return }
        var files: [Digest] = []
        var subdirectories: [Digest] = []
        let entries = dir.entries
        for i in entries.indices {
            guard let d = entries.digest(at: i) else { continue }
            if entries.isFile(i) { files.append(d) } else { subdirectories.append(d) }
        }
        storage.prefetch(subdirectories + files)
    }
}
