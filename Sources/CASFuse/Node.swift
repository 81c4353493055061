import CASCore
import FuseKernel
import Glibc

/// One kernel request as a node sees it: its header, where the answer goes,
/// and the filesystem (storage, options, tables).
struct Request {
    let header: FuseRequestHeader
    let reply: FuseReply
    let fs: CASFileSystem
}

/// What a node is, as far as the kernel's file types and errnos go.
enum NodeKind: Sendable {
    case directory, file, symlink
}

/// An inode of the mount: the root, `/sha256`, `/tree`, a directory or
/// symlink of a tree, a blob. `CASFileSystem` resolves the inode of each
/// request to its node once and calls the node's method for the operation;
/// a node answers what it can and inherits the refusals below for the rest.
/// A new kind of directory is one type implementing `lookup`, `readdir`
/// and `attributes`.
protocol Node: AnyObject, Sendable {
    var ino: UInt64 { get }
    var kind: NodeKind { get }

    /// The node's attributes and how long the kernel may keep them.
    func attributes(_ fs: CASFileSystem, writer: WriteHandle?) -> FuseAttributes
    func attributeTimeout(_ fs: CASFileSystem) -> Double

    func lookup(_ r: Request, _ name: FuseName)
    func opendir(_ r: Request)
    func readdir(_ r: Request, fh: UInt64, offset: UInt64, size: Int, plus: Bool)
    func open(_ r: Request, flags: UInt32)
    /// A read without a handle of its own (an open-less open).
    func read(_ r: Request, offset: Int64, size: UInt32)
    func readlink(_ r: Request)
    func setattr(_ r: Request, _ s: FuseSetattr)
    func create(_ r: Request, name: FuseName, flags: UInt32)
    func unlink(_ r: Request, name: FuseName)
    func mknod(_ r: Request, name: FuseName, mode: UInt32)
    /// The value of an extended attribute, nil when the node has none by that name.
    func xattr(_ fs: CASFileSystem, name: String) -> [UInt8]?
    func xattrNames(_ fs: CASFileSystem) -> [String]

    /// Same inode number, same thing: false means two things collided on
    /// one number (the newcomer is refused).
    func isSame(as other: any Node) -> Bool
    /// The kernel forgot the node (its last reference went).
    func forgotten(_ fs: CASFileSystem)
}

extension Node {
    func attributeTimeout(_ fs: CASFileSystem) -> Double { fs.options.attrTimeout }

    func getattr(_ r: Request, fh: UInt64?) {
        let writer = fh.flatMap { r.fs.handles.write($0) }
        r.reply.attributes(attributes(r.fs, writer: writer), timeout: attributeTimeout(r.fs))
    }

    func lookup(_ r: Request, _ name: FuseName) { r.reply.error(ENOTDIR) }

    func opendir(_ r: Request) {
        guard kind == .directory else { return r.reply.error(ENOTDIR) }
        // The kernel opens directories itself from now on (open-less mounts).
        if r.fs.openless { return r.reply.error(ENOSYS) }
        let fh = r.fs.handles.add(.directory(DirectoryHandle(inode: ino)))
        r.reply.open(fh: fh, flags: [])
        if !r.reply.delivered { r.fs.handles.remove(fh) }
    }

    func readdir(_ r: Request, fh: UInt64, offset: UInt64, size: Int, plus: Bool) { r.reply.error(ENOTDIR) }

    func open(_ r: Request, flags: UInt32) { r.reply.error(kind == .directory ? EISDIR : ELOOP) }
    func read(_ r: Request, offset: Int64, size: UInt32) { r.reply.error(kind == .directory ? EISDIR : EINVAL) }
    func readlink(_ r: Request) { r.reply.error(EINVAL) }
    func setattr(_ r: Request, _ s: FuseSetattr) { r.reply.error(r.fs.changeErrno) }

    func create(_ r: Request, name: FuseName, flags: UInt32) {
        r.reply.error(!r.fs.options.writable ? EROFS : kind == .directory ? r.fs.changeErrno : ENOTDIR)
    }

    func unlink(_ r: Request, name: FuseName) {
        r.reply.error(!r.fs.options.writable ? EROFS : kind == .directory ? r.fs.changeErrno : ENOTDIR)
    }

    func mknod(_ r: Request, name: FuseName, mode: UInt32) {
        r.reply.error(r.fs.options.writable ? EPERM : EROFS)
    }

    func xattr(_ fs: CASFileSystem, name: String) -> [UInt8]? { nil }
    func xattrNames(_ fs: CASFileSystem) -> [String] { [] }
    func forgotten(_ fs: CASFileSystem) {}

    /// The entry a LOOKUP (or READDIRPLUS) hands the kernel for this node.
    func entry(_ fs: CASFileSystem, timeout: Double) -> FuseEntry {
        FuseEntry(nodeid: ino, entryTimeout: timeout, attrTimeout: timeout, attributes: attributes(fs, writer: nil))
    }

    var fileType: FuseFileType {
        switch kind {
        case .directory: return .directory
        case .file: return .regular
        case .symlink: return .symlink
        }
    }
}
