import Glibc

/// The header every request starts with (`struct fuse_in_header`).
public struct FuseRequestHeader: Sendable {
    public var length: UInt32
    public var opcode: UInt32
    public var unique: UInt64
    public var nodeid: UInt64
    public var uid: UInt32
    public var gid: UInt32
    /// The thread id of the caller (0 for kernel-internal requests).
    public var pid: UInt32

    public var operation: FuseOpcode? { FuseOpcode(rawValue: opcode) }
}

/// A name from a request: the bytes as the kernel sent them (no NUL), valid
/// only while the request is being handled.
public struct FuseName: @unchecked Sendable {
    public let bytes: UnsafeRawBufferPointer

    public var array: [UInt8] { Array(bytes) }
    /// The name as text (not repaired: invalid UTF-8 is replaced).
    public var string: String { String(decoding: bytes, as: UTF8.self) }
    public func equals(_ s: StaticString) -> Bool {
        s.utf8CodeUnitCount == bytes.count && memcmp(s.utf8Start, bytes.baseAddress!, bytes.count) == 0
    }
}

/// SETATTR's arguments.
public struct FuseSetattr: Sendable {
    public var valid: FuseSetattrValid
    public var fh: UInt64
    public var size: UInt64
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
}

/// INIT as the kernel sends it.
public struct FuseInitIn: Sendable {
    public var major: UInt32
    public var minor: UInt32
    public var maxReadahead: UInt32
    public var flags: FuseInitFlags
}

/// A decoded request. Pointers (names, write data) point into the request
/// buffer and are valid only while the request is handled.
public enum FuseOperation: @unchecked Sendable {
    case lookup(name: FuseName)
    case forget(nlookup: UInt64)
    case batchForget([(nodeid: UInt64, nlookup: UInt64)])
    case getattr(fh: UInt64?)
    case setattr(FuseSetattr)
    case readlink
    case symlink(name: FuseName, target: FuseName)
    case mknod(name: FuseName, mode: UInt32)
    case mkdir(name: FuseName, mode: UInt32)
    case unlink(name: FuseName)
    case rmdir(name: FuseName)
    case rename(newParent: UInt64, name: FuseName, newName: FuseName)
    case link(oldNode: UInt64, newName: FuseName)
    case open(flags: UInt32)
    case read(fh: UInt64, offset: UInt64, size: UInt32)
    case write(fh: UInt64, offset: UInt64, data: UnsafeRawBufferPointer)
    case statfs
    case release(fh: UInt64, flags: UInt32)
    case fsync(fh: UInt64)
    case setxattr(name: FuseName)
    case getxattr(name: FuseName, size: UInt32)
    case listxattr(size: UInt32)
    case removexattr(name: FuseName)
    case flush(fh: UInt64)
    case initialize(FuseInitIn)
    case opendir(flags: UInt32)
    case readdir(fh: UInt64, offset: UInt64, size: UInt32, plus: Bool)
    case releasedir(fh: UInt64)
    case fsyncdir(fh: UInt64)
    case access(mask: UInt32)
    case create(name: FuseName, flags: UInt32, mode: UInt32)
    case interrupt(unique: UInt64)
    case destroy
    case lseek(fh: UInt64, offset: UInt64, whence: UInt32)
    /// Any change to the tree the filesystem refuses alike (fallocate, copy_file_range, ...).
    case refusedChange
    /// An opcode this module does not decode: answered ENOSYS.
    case unsupported(UInt32)
}

public enum FuseDecodeError: Error, Equatable, Sendable {
    case short(String)
    case badHeader(String)
}

/// Reads little-endian fields from a request, never past its end.
struct RequestReader {
    let buffer: UnsafeRawBufferPointer
    var offset = 0

    init(_ buffer: UnsafeRawBufferPointer) { self.buffer = buffer }

    var remaining: Int { buffer.count - offset }

    mutating func u32(_ what: StaticString) throws(FuseDecodeError) -> UInt32 {
        guard remaining >= 4 else { throw .short("\(what)") }
        let v = buffer.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
        offset += 4
        return UInt32(littleEndian: v)
    }

    mutating func u64(_ what: StaticString) throws(FuseDecodeError) -> UInt64 {
        guard remaining >= 8 else { throw .short("\(what)") }
        let v = buffer.loadUnaligned(fromByteOffset: offset, as: UInt64.self)
        offset += 8
        return UInt64(littleEndian: v)
    }

    mutating func skip(_ n: Int, _ what: StaticString) throws(FuseDecodeError) {
        guard n >= 0, remaining >= n else { throw .short("\(what)") }
        offset += n
    }

    /// A NUL-terminated name (the NUL is required and not part of it).
    mutating func name(_ what: StaticString) throws(FuseDecodeError) -> FuseName {
        guard remaining > 0, let base = buffer.baseAddress else { throw .short("\(what)") }
        let start = base + offset
        guard let nul = memchr(start, 0, remaining) else { throw .short("\(what) without NUL") }
        let n = UnsafeRawPointer(nul) - UnsafeRawPointer(start)
        offset += n + 1
        return FuseName(bytes: UnsafeRawBufferPointer(start: start, count: n))
    }

    mutating func bytes(_ n: Int, _ what: StaticString) throws(FuseDecodeError) -> UnsafeRawBufferPointer {
        guard n >= 0, remaining >= n else { throw .short("\(what)") }
        let out = UnsafeRawBufferPointer(rebasing: buffer[offset..<(offset + n)])
        offset += n
        return out
    }
}

/// Turns the bytes of one request into a header and an operation.
public enum FuseDecoder {
    public static func header(_ buffer: UnsafeRawBufferPointer) throws(FuseDecodeError) -> FuseRequestHeader {
        var r = RequestReader(buffer)
        let length = try r.u32("len")
        let opcode = try r.u32("opcode")
        let unique = try r.u64("unique")
        let nodeid = try r.u64("nodeid")
        let uid = try r.u32("uid")
        let gid = try r.u32("gid")
        let pid = try r.u32("pid")
        try r.skip(4, "padding")
        guard Int(length) == buffer.count else {
            throw .badHeader("length \(length) but \(buffer.count) bytes read")
        }
        return FuseRequestHeader(length: length, opcode: opcode, unique: unique, nodeid: nodeid, uid: uid, gid: gid, pid: pid)
    }

    /// Decodes the body after the header. `buffer` is the whole request.
    public static func operation(_ h: FuseRequestHeader, _ buffer: UnsafeRawBufferPointer) throws(FuseDecodeError) -> FuseOperation {
        var r = RequestReader(buffer)
        r.offset = FuseABI.inHeaderSize
        guard let op = h.operation else { return .unsupported(h.opcode) }
        switch op {
        case .lookup: return .lookup(name: try r.name("lookup name"))
        case .forget: return .forget(nlookup: try r.u64("nlookup"))
        case .batchForget:
            let count = try r.u32("count")
            try r.skip(4, "dummy")
            // Each entry is 16 bytes: the count must fit in what was sent.
            guard Int(count) <= r.remaining / 16 else { throw .short("batch_forget of \(count)") }
            var items: [(UInt64, UInt64)] = []
            items.reserveCapacity(Int(count))
            for _ in 0..<count { items.append((try r.u64("nodeid"), try r.u64("nlookup"))) }
            return .batchForget(items.map { (nodeid: $0.0, nlookup: $0.1) })
        case .getattr:
            let flags = try r.u32("getattr_flags")
            try r.skip(4, "dummy")
            let fh = try r.u64("fh")
            return .getattr(fh: flags & 1 != 0 ? fh : nil)
        case .setattr:
            let valid = try r.u32("valid")
            try r.skip(4, "padding")
            let fh = try r.u64("fh")
            let size = try r.u64("size")
            try r.skip(8 * 4 + 4 * 3, "lock_owner and times")
            let mode = try r.u32("mode")
            try r.skip(4, "unused4")
            let uid = try r.u32("uid")
            let gid = try r.u32("gid")
            return .setattr(FuseSetattr(valid: FuseSetattrValid(rawValue: valid), fh: fh, size: size, mode: mode, uid: uid, gid: gid))
        case .readlink: return .readlink
        case .symlink:
            let name = try r.name("symlink name")
            return .symlink(name: name, target: try r.name("symlink target"))
        case .mknod:
            let mode = try r.u32("mode")
            try r.skip(12, "rdev, umask, padding")
            return .mknod(name: try r.name("mknod name"), mode: mode)
        case .mkdir:
            let mode = try r.u32("mode")
            try r.skip(4, "umask")
            return .mkdir(name: try r.name("mkdir name"), mode: mode)
        case .unlink: return .unlink(name: try r.name("unlink name"))
        case .rmdir: return .rmdir(name: try r.name("rmdir name"))
        case .rename:
            let dir = try r.u64("newdir")
            let name = try r.name("old name")
            return .rename(newParent: dir, name: name, newName: try r.name("new name"))
        case .rename2:
            let dir = try r.u64("newdir")
            try r.skip(8, "flags")
            let name = try r.name("old name")
            return .rename(newParent: dir, name: name, newName: try r.name("new name"))
        case .link:
            let old = try r.u64("oldnodeid")
            return .link(oldNode: old, newName: try r.name("link name"))
        case .open: return .open(flags: try r.u32("flags"))
        case .opendir: return .opendir(flags: try r.u32("flags"))
        case .read, .readdir, .readdirplus:
            let fh = try r.u64("fh")
            let offset = try r.u64("offset")
            let size = try r.u32("size")
            if op == .read { return .read(fh: fh, offset: offset, size: size) }
            return .readdir(fh: fh, offset: offset, size: size, plus: op == .readdirplus)
        case .write:
            let fh = try r.u64("fh")
            let offset = try r.u64("offset")
            let size = try r.u32("size")
            try r.skip(4 + 8 + 4 + 4, "write_flags, lock_owner, flags, padding")
            return .write(fh: fh, offset: offset, data: try r.bytes(Int(size), "write data"))
        case .statfs: return .statfs
        case .release, .releasedir:
            let fh = try r.u64("fh")
            let flags = try r.u32("flags")
            return op == .release ? .release(fh: fh, flags: flags) : .releasedir(fh: fh)
        case .fsync: return .fsync(fh: try r.u64("fh"))
        case .fsyncdir: return .fsyncdir(fh: try r.u64("fh"))
        case .setxattr:
            try r.skip(8, "size, flags")
            return .setxattr(name: try r.name("xattr name"))
        case .getxattr:
            let size = try r.u32("size")
            try r.skip(4, "padding")
            return .getxattr(name: try r.name("xattr name"), size: size)
        case .listxattr:
            let size = try r.u32("size")
            return .listxattr(size: size)
        case .removexattr: return .removexattr(name: try r.name("xattr name"))
        case .flush: return .flush(fh: try r.u64("fh"))
        case .initialize:
            let major = try r.u32("major")
            let minor = try r.u32("minor")
            let readahead = try r.u32("max_readahead")
            let flags = try r.u32("flags")
            // flags2 exists from 7.36, and counts only when INIT_EXT is set.
            let flags2 = r.remaining >= 4 ? try r.u32("flags2") : 0
            var all = UInt64(flags)
            if all & FuseInitFlags.initExt.rawValue != 0 { all |= UInt64(flags2) << 32 }
            return .initialize(FuseInitIn(major: major, minor: minor, maxReadahead: readahead, flags: FuseInitFlags(rawValue: all)))
        case .access: return .access(mask: try r.u32("mask"))
        case .create:
            let flags = try r.u32("flags")
            let mode = try r.u32("mode")
            try r.skip(8, "umask, open_flags")
            return .create(name: try r.name("create name"), flags: flags, mode: mode)
        case .interrupt: return .interrupt(unique: try r.u64("unique"))
        case .destroy: return .destroy
        case .lseek:
            let fh = try r.u64("fh")
            let offset = try r.u64("offset")
            return .lseek(fh: fh, offset: offset, whence: try r.u32("whence"))
        case .fallocate, .copyFileRange, .copyFileRange64, .tmpfile, .setlk, .setlkw:
            return .refusedChange
        default:
            return .unsupported(h.opcode)
        }
    }
}
