import FuseKernel
import Glibc

/// Requests as the kernel encodes them (the `fuse_*_in` structures).
extension FuseHarness {
    typealias L = FuseHarness

    public func lookup(_ parent: UInt64, _ name: String) -> Reply? { send(.lookup, parent, L.cstr(name)) }

    public func getattr(_ ino: UInt64, fh: UInt64? = nil) -> Reply? {
        send(.getattr, ino, L.le(UInt32(fh == nil ? 0 : 1)) + L.le(UInt32(0)) + L.le(fh ?? 0))
    }

    public func readlink(_ ino: UInt64) -> Reply? { send(.readlink, ino) }

    public func open(_ ino: UInt64, flags: Int32 = O_RDONLY) -> Reply? {
        send(.open, ino, L.le(UInt32(bitPattern: flags)) + L.le(UInt32(0)))
    }

    public func opendir(_ ino: UInt64) -> Reply? { send(.opendir, ino, L.le(UInt32(0)) + L.le(UInt32(0))) }

    static func readIn(fh: UInt64, offset: UInt64, size: UInt32) -> [UInt8] {
        L.le(fh) + L.le(offset) + L.le(size) + L.le(UInt32(0)) + L.le(UInt64(0)) + L.le(UInt32(0)) + L.le(UInt32(0))
    }

    public func read(_ ino: UInt64, fh: UInt64 = 0, offset: UInt64, size: UInt32) -> Reply? {
        send(.read, ino, Self.readIn(fh: fh, offset: offset, size: size))
    }

    public func readdir(_ ino: UInt64, fh: UInt64 = 0, offset: UInt64 = 0, size: UInt32 = 4096, plus: Bool = false) -> Reply? {
        send(plus ? .readdirplus : .readdir, ino, Self.readIn(fh: fh, offset: offset, size: size))
    }

    /// Every entry of a directory, READDIR by READDIR from offset 0.
    public func listAll(_ ino: UInt64, fh: UInt64 = 0, size: UInt32 = 4096) throws -> [Dirent] {
        var out: [Dirent] = []
        var offset: UInt64 = 0
        while true {
            guard let r = readdir(ino, fh: fh, offset: offset, size: size) else { throw ReplyDecodeError("no readdir answer") }
            let page = try r.dirents()
            guard let last = page.last else { return out }
            out += page
            offset = last.nextOffset
        }
    }

    /// Every entry of a directory, READDIRPLUS by READDIRPLUS from offset 0.
    public func listAllPlus(_ ino: UInt64, fh: UInt64 = 0, size: UInt32 = 4096) throws -> [DirentPlus] {
        var out: [DirentPlus] = []
        var offset: UInt64 = 0
        while true {
            guard let r = readdir(ino, fh: fh, offset: offset, size: size, plus: true) else {
                throw ReplyDecodeError("no readdirplus answer")
            }
            let page = try r.direntsPlus()
            guard let last = page.last else { return out }
            out += page
            offset = last.dirent.nextOffset
        }
    }

    public func write(_ ino: UInt64, fh: UInt64, offset: UInt64, _ data: [UInt8]) -> Reply? {
        send(.write, ino, L.le(fh) + L.le(offset) + L.le(UInt32(data.count)) + L.le(UInt32(0)) + L.le(UInt64(0))
             + L.le(UInt32(0)) + L.le(UInt32(0)) + data)
    }

    static func fhIn(_ fh: UInt64) -> [UInt8] { L.le(fh) + L.le(UInt32(0)) + L.le(UInt32(0)) + L.le(UInt64(0)) }

    public func flush(_ ino: UInt64, fh: UInt64) -> Reply? { send(.flush, ino, Self.fhIn(fh)) }
    public func release(_ ino: UInt64, fh: UInt64) -> Reply? { send(.release, ino, Self.fhIn(fh)) }
    public func releasedir(_ ino: UInt64, fh: UInt64) -> Reply? { send(.releasedir, ino, Self.fhIn(fh)) }

    public func create(_ parent: UInt64, _ name: String, flags: Int32 = O_WRONLY | O_CREAT, mode: UInt32 = 0o644) -> Reply? {
        send(.create, parent, L.le(UInt32(bitPattern: flags)) + L.le(mode) + L.le(UInt64(0)) + L.cstr(name))
    }

    public func unlink(_ parent: UInt64, _ name: String) -> Reply? { send(.unlink, parent, L.cstr(name)) }

    public func mkdir(_ parent: UInt64, _ name: String, mode: UInt32 = 0o755) -> Reply? {
        send(.mkdir, parent, L.le(mode) + L.le(UInt32(0)) + L.cstr(name))
    }

    /// SETATTR with `valid` bits, a handle and a size (the other fields zero).
    public func setattr(_ ino: UInt64, valid: FuseSetattrValid, fh: UInt64 = 0, size: UInt64 = 0,
                        pid: UInt32 = UInt32(getpid())) -> Reply? {
        var body = L.le(valid.rawValue) + L.le(UInt32(0)) + L.le(fh) + L.le(size)
        body += [UInt8](repeating: 0, count: 88 - body.count)
        return send(.setattr, ino, body, pid: pid)
    }

    public func getxattr(_ ino: UInt64, _ name: String, size: UInt32) -> Reply? {
        send(.getxattr, ino, L.le(size) + L.le(UInt32(0)) + L.cstr(name))
    }

    public func listxattr(_ ino: UInt64, size: UInt32) -> Reply? { send(.listxattr, ino, L.le(size) + L.le(UInt32(0))) }

    public func statfs() -> Reply? { send(.statfs, FuseABI.rootID) }

    /// FORGET is not answered.
    public func forget(_ ino: UInt64, _ n: UInt64) { send(.forget, ino, L.le(n), expectReply: false) }
}
