import FuseKernel

/// A reply too short (or otherwise wrong) for the structure asked of it.
public struct ReplyDecodeError: Error, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}

/// `struct fuse_attr`.
public struct AttrOut: Equatable, Sendable {
    public var ino, size, blocks: UInt64
    public var atime, mtime, ctime: UInt64
    public var atimensec, mtimensec, ctimensec: UInt32
    public var mode, nlink, uid, gid, blksize: UInt32

    public var type: UInt32 { mode & 0o170000 }
    public var permissions: UInt32 { mode & 0o7777 }
    public var isDirectory: Bool { type == 0o040000 }
    public var isRegular: Bool { type == 0o100000 }
    public var isSymlink: Bool { type == 0o120000 }

    init(_ f: Fields, at o: Int) {
        ino = f.u64(o); size = f.u64(o + 8); blocks = f.u64(o + 16)
        atime = f.u64(o + 24); mtime = f.u64(o + 32); ctime = f.u64(o + 40)
        atimensec = f.u32(o + 48); mtimensec = f.u32(o + 52); ctimensec = f.u32(o + 56)
        mode = f.u32(o + 60); nlink = f.u32(o + 64); uid = f.u32(o + 68); gid = f.u32(o + 72)
        blksize = f.u32(o + 80)
    }
}

/// `struct fuse_entry_out`: nodeid 0 is a negative entry.
public struct EntryOut: Sendable {
    public var nodeid, generation: UInt64
    /// Seconds (with the nanoseconds as a fraction).
    public var entryTimeout, attrTimeout: Double
    public var attr: AttrOut

    public var isNegative: Bool { nodeid == 0 }

    init(_ f: Fields, at o: Int) {
        nodeid = f.u64(o); generation = f.u64(o + 8)
        entryTimeout = Double(f.u64(o + 16)) + Double(f.u32(o + 32)) / 1e9
        attrTimeout = Double(f.u64(o + 24)) + Double(f.u32(o + 36)) / 1e9
        attr = AttrOut(f, at: o + 40)
    }
}

/// `struct fuse_open_out`.
public struct OpenOut: Sendable {
    public var fh: UInt64
    public var flags: FuseOpenFlags
    public var backingID: Int32
}

/// One READDIR entry (`struct fuse_dirent`).
public struct Dirent: Sendable {
    public var ino, nextOffset: UInt64
    public var type: UInt32
    public var name: String
}

/// One READDIRPLUS entry: the entry (looked up unless its nodeid is 0) and the dirent.
public struct DirentPlus: Sendable {
    public var entry: EntryOut
    public var dirent: Dirent
    public var name: String { dirent.name }
}

/// `struct fuse_statfs_out`.
public struct StatfsOut: Sendable {
    public var blocks, blocksFree, blocksAvailable, files, filesFree: UInt64
    public var blockSize, nameLength, fragmentSize: UInt32
}

extension Reply {
    /// Throws unless the request succeeded with at least `n` bytes.
    func need(_ n: Int, _ what: String) throws {
        guard error == 0 else { throw ReplyDecodeError("\(what): answered with errno \(error)") }
        guard payload.count >= n else { throw ReplyDecodeError("\(what): \(payload.count) bytes, need \(n)") }
    }

    public var fields: Fields { Fields(b: payload) }

    /// A LOOKUP answer.
    public func entry() throws -> EntryOut {
        try need(FuseABI.entryOutSize, "entry")
        return EntryOut(fields, at: 0)
    }

    /// A GETATTR/SETATTR answer: the attributes and their timeout.
    public func attributes() throws -> (attr: AttrOut, timeout: Double) {
        try need(FuseABI.attrOutSize, "attr")
        let f = fields
        return (AttrOut(f, at: 16), Double(f.u64(0)) + Double(f.u32(8)) / 1e9)
    }

    public func open() throws -> OpenOut {
        try need(FuseABI.openOutSize, "open")
        let f = fields
        return OpenOut(fh: f.u64(0), flags: FuseOpenFlags(rawValue: f.u32(8)), backingID: Int32(bitPattern: f.u32(12)))
    }

    /// A CREATE answer: the entry and the open file.
    public func created() throws -> (entry: EntryOut, open: OpenOut) {
        try need(FuseABI.entryOutSize + FuseABI.openOutSize, "create")
        let f = fields
        let o = FuseABI.entryOutSize
        return (EntryOut(f, at: 0),
                OpenOut(fh: f.u64(o), flags: FuseOpenFlags(rawValue: f.u32(o + 8)), backingID: Int32(bitPattern: f.u32(o + 12))))
    }

    /// The entries of a READDIR answer.
    public func dirents() throws -> [Dirent] {
        try need(0, "readdir")
        var out: [Dirent] = []
        var o = 0
        while o + FuseABI.direntHeaderSize <= payload.count {
            let (d, size) = try dirent(at: o)
            out.append(d)
            o += size
        }
        guard o == payload.count else { throw ReplyDecodeError("readdir: \(payload.count - o) trailing bytes") }
        return out
    }

    /// The entries of a READDIRPLUS answer.
    public func direntsPlus() throws -> [DirentPlus] {
        try need(0, "readdirplus")
        var out: [DirentPlus] = []
        var o = 0
        while o + FuseABI.entryOutSize + FuseABI.direntHeaderSize <= payload.count {
            let e = EntryOut(fields, at: o)
            let (d, size) = try dirent(at: o + FuseABI.entryOutSize)
            out.append(DirentPlus(entry: e, dirent: d))
            o += FuseABI.entryOutSize + size
        }
        guard o == payload.count else { throw ReplyDecodeError("readdirplus: \(payload.count - o) trailing bytes") }
        return out
    }

    private func dirent(at o: Int) throws -> (Dirent, Int) {
        let f = fields
        let namelen = Int(f.u32(o + 16))
        let size = (FuseABI.direntHeaderSize + namelen + 7) & ~7
        guard o + size <= payload.count else { throw ReplyDecodeError("dirent at \(o) runs past the reply") }
        let name = String(decoding: payload[(o + 24)..<(o + 24 + namelen)], as: UTF8.self)
        return (Dirent(ino: f.u64(o), nextOffset: f.u64(o + 8), type: f.u32(o + 20), name: name), size)
    }

    public func statfs() throws -> StatfsOut {
        try need(FuseABI.statfsOutSize, "statfs")
        let f = fields
        return StatfsOut(blocks: f.u64(0), blocksFree: f.u64(8), blocksAvailable: f.u64(16), files: f.u64(24),
                         filesFree: f.u64(32), blockSize: f.u32(40), nameLength: f.u32(44), fragmentSize: f.u32(48))
    }

    /// A GETXATTR/LISTXATTR answer to a size query (size 0).
    public func xattrSize() throws -> Int {
        try need(FuseABI.xattrOutSize, "xattr size")
        return Int(fields.u32(0))
    }

    /// A WRITE answer.
    public func written() throws -> Int {
        try need(FuseABI.writeOutSize, "write")
        return Int(fields.u32(0))
    }

    /// The NUL-separated names of a LISTXATTR answer.
    public var names: [String] {
        payload.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
    }
}
