import CASCore
import FuseKernel
import Glibc

/// The fixed directories: the root (`sha256/`, `tree/`) and `/tree`, whose
/// children are reached by digest only. `/sha256` is `Sha256Directory`.
final class RootNode: Node {
    let ino = FixedInode.root
    let kind = NodeKind.directory

    func attributes(_ fs: CASFileSystem, writer: WriteHandle?) -> FuseAttributes { fs.fixedDirectoryAttributes(ino) }

    func lookup(_ r: Request, _ name: FuseName) {
        let child: any Node
        if name.equals("sha256") {
            child = r.fs.sha256Directory
        } else if name.equals("tree") {
            child = r.fs.treeRoot
        } else {
            return r.fs.negativeEntry(r.reply)
        }
        r.reply.entry(child.entry(r.fs, timeout: r.fs.options.entryTimeout))
    }

    func readdir(_ r: Request, fh: UInt64, offset: UInt64, size: Int, plus: Bool) {
        let fs = r.fs
        let children: [(String, any Node)] = [("sha256", fs.sha256Directory), ("tree", fs.treeRoot)]
        r.reply.directory(size: size) { filler in
            // Offsets: 1 after ".", 2 after "..", 3 and 4 after the children.
            var pos = offset
            while pos < 2 + UInt64(children.count) {
                let added: Bool
                switch pos {
                case 0, 1:
                    added = fs.addListed(&filler, pos == 0 ? "." : "..", attributes(fs, writer: nil), next: pos + 1,
                                         plus: plus, entry: nil)
                default:
                    let (name, child) = children[Int(pos - 2)]
                    added = fs.addListed(&filler, name, child.attributes(fs, writer: nil), next: pos + 1, plus: plus,
                                         entry: child.entry(fs, timeout: fs.options.entryTimeout))
                }
                guard added else { return 0 }
                pos += 1
            }
            return 0
        }
    }

    func xattr(_ fs: CASFileSystem, name: String) -> [UInt8]? {
        switch name {
        case CASFileSystem.statsXattr: return Array(fs.statisticsJSON().utf8)
        case CASFileSystem.configXattr: return fs.options.configPath.map { Array($0.utf8) }
        default: return nil
        }
    }

    func xattrNames(_ fs: CASFileSystem) -> [String] {
        fs.options.configPath == nil ? [CASFileSystem.statsXattr] : [CASFileSystem.statsXattr, CASFileSystem.configXattr]
    }

    func isSame(as other: any Node) -> Bool { other === self }
}

/// `/tree`: each child is named by the digest of a REAPI Directory; the
/// directory lists nothing (trees are reached by digest).
final class TreeRootNode: Node {
    let ino = FixedInode.tree
    let kind = NodeKind.directory

    func attributes(_ fs: CASFileSystem, writer: WriteHandle?) -> FuseAttributes { fs.fixedDirectoryAttributes(ino) }

    func lookup(_ r: Request, _ name: FuseName) {
        guard let digest = Digest(parsing: name.string) else { return r.fs.negativeEntry(r.reply) }
        guard let d = r.fs.loadDirectory(digest, op: "lookup", r.reply) else { return }
        r.fs.replyTreeDirectory(TreeDirectoryNode(parent: ino, name: name.array, digest: digest, d, fs: r.fs), d, r.reply)
    }

    func readdir(_ r: Request, fh: UInt64, offset: UInt64, size: Int, plus: Bool) {
        let fs = r.fs
        r.reply.directory(size: size) { filler in
            var pos = offset
            while pos < 2 {
                guard fs.addListed(&filler, pos == 0 ? "." : "..", fs.fixedDirectoryAttributes(pos == 0 ? ino : FixedInode.root),
                                   next: pos + 1, plus: plus, entry: nil) else { return 0 }
                pos += 1
            }
            return 0
        }
    }

    func isSame(as other: any Node) -> Bool { other === self }
}
