import CASCore
import CASTree
import CFuse
import Foundation

/// `/tree/<hash>_<size>/…`: REAPI Directory blobs shown as read-only trees.
/// Directory blobs are loaded (and checked) on first lookup; files are the
/// blobs themselves, read through the same path as `/sha256`.
extension CASFilesystem {
    func treeTime(_ t: TreeTime?) -> timespec {
        guard let t else { return Self.blobTime }
        return timespec(tv_sec: Int(t.seconds), tv_nsec: Int(t.nanos))
    }

    func treeNodeAttr(_ ino: UInt64, _ node: TreeInodes.Node) -> stat {
        var st = stat()
        st.st_ino = UInt(ino)
        st.st_uid = uid
        st.st_gid = gid
        st.st_blksize = 4096
        switch node.kind {
        case .directory:
            st.st_mode = S_IFDIR | node.mode
            st.st_size = 4096
        case .symlink(let target):
            st.st_mode = S_IFLNK | 0o777
            st.st_size = target.utf8.count
        }
        st.st_nlink = UInt(node.nlink)
        let t = treeTime(node.mtime)
        st.st_atim = t
        st.st_mtim = t
        st.st_ctim = t
        return st
    }

    /// Loads a Directory for a lookup or listing; nil after replying with the error.
    func loadDirectory(_ req: fuse_req_t?, _ digest: Digest, op: String) -> TreeDirectory? {
        do {
            switch try directories.load(digest) {
            case .directory(let d):
                // A tree in use keeps its Directory blobs fresh in the index,
                // as opens do for files (batched, never blocking).
                recordAccess?(digest)
                return d
            case .absent:
                replyNegative(req)
                return nil
            case .invalid(let e):
                counters.errors.add()
                log.error("\(op): tree \(digest): \(e)")
                replyErr(req, EIO)
                return nil
            }
        } catch {
            fail(req, op, error, "tree \(digest)")
            return nil
        }
    }

    func directoryNode(parent: UInt64, name: some Collection<UInt8>, digest: Digest, _ d: TreeDirectory) -> TreeInodes.Node {
        TreeInodes.Node(kind: .directory(digest), parent: parent, name: Array(name),
                        mode: d.properties.mode ?? 0o555, mtime: d.properties.mtime,
                        nlink: 2 + d.subdirectoryCount)
    }

    func replyTreeNode(_ req: fuse_req_t?, _ node: TreeInodes.Node) {
        guard let ino = treeNodes.remember(node) else {
            log.error("tree inode collision at \(String(decoding: node.name, as: UTF8.self)) under \(node.parent)")
            counters.errors.add()
            return replyErr(req, EIO)
        }
        var e = entry(ino: ino, attr: treeNodeAttr(ino, node), timeout: options.entryTimeout)
        if fuse_reply_entry(req, &e) != 0 { treeNodes.forget(ino, 1) }
    }

    /// lookup in /tree: the name is a Directory digest.
    func lookupTreeRoot(_ req: fuse_req_t?, name: [UInt8]) {
        guard let digest = Digest(parsing: String(decoding: name, as: UTF8.self)) else { return replyNegative(req) }
        guard let d = loadDirectory(req, digest, op: "lookup") else { return }
        replyTreeNode(req, directoryNode(parent: FixedInode.tree, name: name, digest: digest, d))
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
    func lookupInTree(_ req: fuse_req_t?, parent: UInt64, digest parentDigest: Digest, name: [UInt8]) {
        guard let dir = loadDirectory(req, parentDigest, op: "lookup") else { return }
        prefetchFiles(parentDigest, dir)
        guard let child = dir.entry(named: name) else {
            // The tree is immutable: the name will never appear.
            var e = fuse_entry_param()
            e.entry_timeout = options.entryTimeout
            fuse_reply_entry(req, &e)
            return
        }
        switch child.kind {
        case .file(let digest, let executable):
            if openless { recordAccess?(digest) }
            replyFileEntry(req, digest, FileVariant(executable: executable, properties: child.properties),
                           timeout: options.entryTimeout)
        case .directory(let digest):
            guard let sub = loadDirectory(req, digest, op: "lookup \(child.name) in") else { return }
            replyTreeNode(req, directoryNode(parent: parent, name: name, digest: digest, sub))
        case .symlink(let target):
            replyTreeNode(req, TreeInodes.Node(kind: .symlink(target), parent: parent, name: name, mode: 0o777,
                                               mtime: child.properties.mtime, nlink: 1))
        }
    }

    func readlink(_ req: fuse_req_t?, ino: UInt64) {
        guard let node = treeNodes.node(ino) else {
            return replyErr(req, inodes.file(ino) != nil || FixedInode.contains(ino) ? EINVAL : ENOENT)
        }
        guard case .symlink(let target) = node.kind else { return replyErr(req, EINVAL) }
        // Returned as text: the kernel resolves it, from the caller's view.
        _ = target.withCString { fuse_reply_readlink(req, $0) }
    }

    /// Fills a listing of a tree directory. Offsets: 1 after ".", 2 after
    /// "..", then 3 + the index of the entry.
    func fillTreeListing(_ req: fuse_req_t?, ino: UInt64, node: TreeInodes.Node, tree: TreeDirectory,
                         offset: Int64, add: (String, stat, Int64, ListedFile?) -> Bool) {
        var pos = offset
        if pos == 0 {
            guard add(".", treeNodeAttr(ino, node), 1, nil) else { return }
            pos = 1
        }
        if pos == 1 {
            var parent = dirAttr(FixedInode.tree)
            if let p = treeNodes.node(node.parent) { parent = treeNodeAttr(node.parent, p) }
            parent.st_ino = UInt(node.parent)
            guard add("..", parent, 2, nil) else { return }
            pos = 2
        }
        var i = Int(pos - 2)
        while i >= 0, i < tree.entries.count {
            let child = tree.entries[i]
            var st = stat()
            let listed: ListedFile?
            switch child.kind {
            case .file(let digest, let executable):
                let variant = FileVariant(executable: executable, properties: child.properties)
                st = fileAttr(digest, variant, ino: fileInode(digest, variant))
                listed = .file(digest, variant)
            case .directory:
                // Attributes need the child's own Directory: left to lookup.
                st.st_ino = UInt(TreeInodes.inode(parent: ino, name: child.nameBytes))
                st.st_mode = S_IFDIR | 0o555
                listed = .unknown
            case .symlink(let target):
                let n = TreeInodes.Node(kind: .symlink(target), parent: ino, name: child.nameBytes, mode: 0o777,
                                        mtime: child.properties.mtime, nlink: 1)
                st = treeNodeAttr(TreeInodes.inode(parent: ino, name: child.nameBytes), n)
                listed = .treeNode(n)
            }
            guard add(child.name, st, Int64(i + 3), listed) else { return }
            i += 1
        }
    }
}

/// What a listing entry stands for, for readdirplus (which counts as a lookup).
enum ListedFile {
    case file(Digest, FileVariant?)
    case treeNode(TreeInodes.Node)
    /// Name and type only; the kernel looks it up when it needs it.
    case unknown
}
