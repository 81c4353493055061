import CASCore
import CASTree
import Foundation
import FuseKernel

/// `/tree/<hash>_<size>/…`: REAPI Directory blobs shown as read-only trees.
/// Directory blobs are loaded (and checked) on first lookup; files are the
/// blobs themselves, read through the same path as `/sha256`.
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
                log.error("\(op): tree \(digest): \(e)")
                reply.error(EIO)
                return nil
            }
        } catch {
            fail(reply, op, error, "tree \(digest)")
            return nil
        }
    }

    func directoryNode(parent: UInt64, name: some Collection<UInt8>, digest: Digest, _ d: TreeDirectory) -> TreeInodes.Node {
        TreeInodes.Node(kind: .directory(digest), parent: parent, name: Array(name),
                        mode: d.properties.mode ?? 0o555, mtime: d.properties.mtime,
                        nlink: 2 + d.subdirectoryCount)
    }

    func replyTreeNode(_ node: TreeInodes.Node, _ reply: FuseReply) {
        guard let ino = treeNodes.remember(node) else {
            log.error("tree inode collision at \(String(decoding: node.name, as: UTF8.self)) under \(node.parent)")
            counters.errors.add()
            return reply.error(EIO)
        }
        reply.entry(entry(ino, treeNodeAttributes(ino, node), timeout: options.entryTimeout))
        if !reply.delivered { treeNodes.forget(ino, 1) }
    }

    /// lookup in /tree: the name is a Directory digest.
    func lookupTreeRoot(_ name: FuseName, _ reply: FuseReply) {
        guard let digest = Digest(parsing: name.string) else { return negativeEntry(reply) }
        guard let d = loadDirectory(digest, op: "lookup", reply) else { return }
        replyTreeNode(directoryNode(parent: FixedInode.tree, name: name.array, digest: digest, d), reply)
    }

    /// The first time a directory of a tree is used, its files are likely to
    /// be read: let the storage fetch the small ones in bulk.
    func prefetchFiles(_ digest: Digest, _ dir: TreeDirectory) {
        guard options.treePrefetch, directories.firstUse(digest) else { return }
        var files: [Digest] = []
        for e in dir.entries {
            if case .file(let d, _) = e.kind { files.append(d) }
        }
        storage.prefetch(files)
    }

    /// lookup of a child of a tree directory.
    func lookupInTree(parent: UInt64, digest parentDigest: Digest, name: FuseName, _ reply: FuseReply) {
        guard let dir = loadDirectory(parentDigest, op: "lookup", reply) else { return }
        prefetchFiles(parentDigest, dir)
        guard let child = dir.entry(named: name.bytes) else {
            // The tree is immutable: the name will never appear.
            return reply.entry(.negative(timeout: options.entryTimeout))
        }
        switch child.kind {
        case .file(let digest, let executable):
            if openless { recordAccess?(digest) }
            replyFileEntry(digest, FileVariant(executable: executable, properties: child.properties),
                           timeout: entryTimeout, reply)
        case .directory(let digest):
            guard let sub = loadDirectory(digest, op: "lookup \(child.name) in", reply) else { return }
            replyTreeNode(directoryNode(parent: parent, name: name.array, digest: digest, sub), reply)
        case .symlink(let target):
            replyTreeNode(TreeInodes.Node(kind: .symlink(target), parent: parent, name: name.array, mode: 0o777,
                                          mtime: child.properties.mtime, nlink: 1), reply)
        }
    }

    private func forgetListed(_ ino: UInt64, _ isNode: Bool) {
        if isNode { treeNodes.forget(ino, 1) } else { inodes.forget(ino, 1) }
    }

    /// A listing of a tree directory. Offsets: 1 after ".", 2 after "..",
    /// then 3 + the index of the entry.
    func treeListing(_ ino: UInt64, _ node: TreeInodes.Node, _ tree: TreeDirectory, offset: UInt64, size: Int,
                     plus: Bool, _ reply: FuseReply) {
        var remembered: [(UInt64, Bool)] = []  // (inode, is a tree node)
        reply.directory(size: size) { filler in
            var pos = offset
            if pos == 0 {
                guard add(&filler, ".", treeNodeAttributes(ino, node), next: 1, plus: plus, remember: nil) else { return 0 }
                pos = 1
            }
            if pos == 1 {
                var parent = dirAttributes(FixedInode.tree)
                if let p = treeNodes.node(node.parent) { parent = treeNodeAttributes(node.parent, p) }
                parent.ino = node.parent
                guard add(&filler, "..", parent, next: 2, plus: plus, remember: nil) else { return 0 }
                pos = 2
            }
            guard pos >= 2, pos - 2 < UInt64(tree.entries.count) else { return 0 }
            var i = Int(pos - 2)
            while i < tree.entries.count {
                let child = tree.entries[i]
                var attrs: FuseAttributes
                var remember: UInt64?
                var isNode = false
                switch child.kind {
                case .file(let digest, let executable):
                    let variant = FileVariant(executable: executable, properties: child.properties)
                    if plus, let r = rememberFile(digest, variant) { remember = r }
                    attrs = fileAttributes(digest, variant, ino: fileInode(digest, variant))
                case .directory:
                    // Attributes need the child's own Directory: left to lookup.
                    attrs = FuseAttributes(ino: TreeInodes.inode(parent: ino, name: child.nameBytes),
                                           mode: FuseFileType.directory.rawValue | 0o555)
                case .symlink(let target):
                    let n = TreeInodes.Node(kind: .symlink(target), parent: ino, name: child.nameBytes, mode: 0o777,
                                            mtime: child.properties.mtime, nlink: 1)
                    attrs = treeNodeAttributes(TreeInodes.inode(parent: ino, name: child.nameBytes), n)
                    if plus, let r = treeNodes.remember(n) {
                        remember = r
                        isNode = true
                    }
                }
                guard add(&filler, child.name, attrs, next: Int64(i + 3), plus: plus, remember: remember,
                          timeout: options.entryTimeout) else {
                    if let r = remember { forgetListed(r, isNode) }
                    return 0
                }
                if let r = remember { remembered.append((r, isNode)) }
                i += 1
            }
            return 0
        }
        if !reply.delivered {
            for (r, isNode) in remembered { forgetListed(r, isNode) }
        }
    }
}
