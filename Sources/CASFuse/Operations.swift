import CASCore
import CFuse
import Foundation

/// The filesystem object stored as session userdata.
@inline(__always)
private func fs(_ req: fuse_req_t?) -> CASFilesystem {
    Unmanaged<CASFilesystem>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
}

@inline(__always)
private func str(_ p: UnsafePointer<CChar>?) -> String {
    p.map { String(cString: $0) } ?? ""
}

/// A name exactly as the kernel sent it (not repaired into valid UTF-8).
@inline(__always)
private func bytes(_ p: UnsafePointer<CChar>?) -> [UInt8] {
    guard let p else { return [] }
    return Array(UnsafeRawBufferPointer(start: p, count: strlen(p)))
}

/// The low-level operation table: non-capturing C callbacks that forward to
/// the filesystem object.
func makeOperations() -> fuse_lowlevel_ops {
    var ops = fuse_lowlevel_ops()
    ops.`init` = { userdata, conn in
        guard let userdata, let conn else { return }
        let f = Unmanaged<CASFilesystem>.fromOpaque(userdata).takeUnretainedValue()
        f.configure(conn)
    }
    ops.lookup = { req, parent, name in fs(req).lookup(req, parent: parent, name: bytes(name)) }
    ops.forget = { req, ino, n in
        fs(req).forget(ino, n)
        fuse_reply_none(req)
    }
    ops.forget_multi = { req, count, forgets in
        let f = fs(req)
        if let forgets {
            for i in 0..<count { f.forget(forgets[i].ino, forgets[i].nlookup) }
        }
        fuse_reply_none(req)
    }
    ops.readlink = { req, ino in fs(req).readlink(req, ino: ino) }
    ops.getattr = { req, ino, _ in fs(req).getattr(req, ino: ino) }
    ops.setattr = { req, ino, attr, toSet, fi in fs(req).setattr(req, ino: ino, attr: attr, toSet: toSet, fi: fi) }
    ops.open = { req, ino, fi in
        guard let fi else { fuse_reply_err(req, EINVAL); return }
        fs(req).open(req, ino: ino, fi: fi)
    }
    ops.create = { req, parent, name, _, fi in
        guard let fi else { fuse_reply_err(req, EINVAL); return }
        fs(req).create(req, parent: parent, name: str(name), fi: fi)
    }
    ops.read = { req, ino, size, off, fi in fs(req).read(req, ino: ino, size: size, offset: Int64(off), fi: fi) }
    ops.write = { req, _, buf, size, off, fi in
        fs(req).write(req, buf: UnsafeRawBufferPointer(start: buf, count: size), offset: Int64(off), fi: fi)
    }
    ops.flush = { req, _, fi in fs(req).flush(req, fi: fi) }
    ops.release = { req, _, fi in fs(req).release(req, fi: fi) }
    ops.fsync = { req, _, _, _ in fuse_reply_err(req, 0) }
    ops.unlink = { req, parent, name in fs(req).unlink(req, parent: parent, name: str(name)) }
    ops.mknod = { req, parent, name, mode, _ in
        let f = fs(req)
        if !f.options.writable { fuse_reply_err(req, EROFS); return }
        // Regular files are made through create; nodes of other kinds never exist here.
        fuse_reply_err(req, (mode & S_IFMT) == S_IFREG && Digest(parsing: str(name)) == nil && parent == FixedInode.sha256 ? EINVAL : EPERM)
    }
    ops.mkdir = { req, _, _, _ in fuse_reply_err(req, fs(req).changeErrno) }
    ops.rmdir = { req, _, _ in fuse_reply_err(req, fs(req).changeErrno) }
    ops.symlink = { req, _, _, _ in fuse_reply_err(req, fs(req).changeErrno) }
    ops.link = { req, _, _, _ in fuse_reply_err(req, fs(req).changeErrno) }
    ops.rename = { req, _, _, _, _, _ in fuse_reply_err(req, fs(req).changeErrno) }
    ops.setxattr = { req, _, _, _, _, _ in fuse_reply_err(req, fs(req).changeErrno) }
    ops.removexattr = { req, _, _ in fuse_reply_err(req, fs(req).changeErrno) }
    ops.getxattr = { req, ino, name, size in fs(req).getxattr(req, ino: ino, name: str(name), size: size) }
    ops.listxattr = { req, ino, size in fs(req).listxattr(req, ino: ino, size: size) }
    ops.statfs = { req, _ in fs(req).statfs(req) }
    ops.opendir = { req, ino, fi in
        guard let fi else { fuse_reply_err(req, EINVAL); return }
        fs(req).opendir(req, ino: ino, fi: fi)
    }
    ops.readdir = { req, ino, size, off, fi in
        fs(req).readdir(req, ino: ino, size: size, offset: Int64(off), fi: fi, plus: false)
    }
    ops.readdirplus = { req, ino, size, off, fi in
        fs(req).readdir(req, ino: ino, size: size, offset: Int64(off), fi: fi, plus: true)
    }
    ops.releasedir = { req, _, fi in fs(req).releasedir(req, fi: fi) }
    return ops
}

extension CASFilesystem {
    /// INIT: request sizes and capabilities, then report readiness.
    func configure(_ conn: UnsafeMutablePointer<fuse_conn_info>) {
        let mib: UInt32 = 1 << 20
        conn.pointee.max_write = mib
        conn.pointee.max_read = UInt32(options.maxRead)
        conn.pointee.max_readahead = min(conn.pointee.max_readahead == 0 ? mib : mib, mib)
        let want = UInt32(FUSE_CAP_ATOMIC_O_TRUNC) | UInt32(FUSE_CAP_ASYNC_READ)
        conn.pointee.want |= want & conn.pointee.capable
        // Replies are memory buffers; avoid the splice path's pipe-size fallbacks.
        conn.pointee.want &= ~UInt32(FUSE_CAP_SPLICE_READ)
        if let ready = onReady.withLock({ r -> (@Sendable () -> Void)? in defer { r = nil }; return r }) {
            ready()
        }
    }
}
