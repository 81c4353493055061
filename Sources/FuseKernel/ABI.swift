/// Facts of the Linux FUSE kernel ABI (protocol 7.45): opcodes, flags and
/// the byte layouts of the messages casfs reads and writes. Layouts are
/// little-endian and 64-bit aligned, as the kernel's `fuse.h` defines them.
public enum FuseABI {
    public static let kernelVersion: UInt32 = 7
    /// The newest minor version this module speaks.
    public static let maxMinor: UInt32 = 45
    /// The oldest minor version it accepts (Linux 5.10 speaks 7.32).
    public static let minMinor: UInt32 = 31
    public static let rootID: UInt64 = 1

    public static let inHeaderSize = 40
    public static let outHeaderSize = 16
    public static let attrSize = 88
    public static let entryOutSize = 40 + attrSize
    public static let attrOutSize = 16 + attrSize
    public static let openOutSize = 16
    public static let writeOutSize = 8
    public static let statfsOutSize = 80
    public static let xattrOutSize = 8
    public static let initOutSize = 64
    public static let direntHeaderSize = 24
    public static let lseekOutSize = 8
}

/// Request opcodes.
public enum FuseOpcode: UInt32, Sendable {
    case lookup = 1, forget = 2, getattr = 3, setattr = 4, readlink = 5, symlink = 6
    case mknod = 8, mkdir = 9, unlink = 10, rmdir = 11, rename = 12, link = 13
    case open = 14, read = 15, write = 16, statfs = 17, release = 18
    case fsync = 20, setxattr = 21, getxattr = 22, listxattr = 23, removexattr = 24
    case flush = 25, initialize = 26, opendir = 27, readdir = 28, releasedir = 29, fsyncdir = 30
    case getlk = 31, setlk = 32, setlkw = 33, access = 34, create = 35, interrupt = 36
    case bmap = 37, destroy = 38, ioctl = 39, poll = 40, notifyReply = 41, batchForget = 42
    case fallocate = 43, readdirplus = 44, rename2 = 45, lseek = 46, copyFileRange = 47
    case setupMapping = 48, removeMapping = 49, syncfs = 50, tmpfile = 51, statx = 52, copyFileRange64 = 53

    public var name: String { "\(self)" }
}

/// INIT flags (the 64-bit word made of `flags` and `flags2`).
public struct FuseInitFlags: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let asyncRead = FuseInitFlags(rawValue: 1 << 0)
    public static let posixLocks = FuseInitFlags(rawValue: 1 << 1)
    public static let atomicOTrunc = FuseInitFlags(rawValue: 1 << 3)
    public static let exportSupport = FuseInitFlags(rawValue: 1 << 4)
    public static let bigWrites = FuseInitFlags(rawValue: 1 << 5)
    public static let dontMask = FuseInitFlags(rawValue: 1 << 6)
    public static let spliceWrite = FuseInitFlags(rawValue: 1 << 7)
    public static let spliceMove = FuseInitFlags(rawValue: 1 << 8)
    public static let spliceRead = FuseInitFlags(rawValue: 1 << 9)
    public static let flockLocks = FuseInitFlags(rawValue: 1 << 10)
    public static let autoInvalData = FuseInitFlags(rawValue: 1 << 12)
    public static let doReaddirplus = FuseInitFlags(rawValue: 1 << 13)
    public static let readdirplusAuto = FuseInitFlags(rawValue: 1 << 14)
    public static let asyncDIO = FuseInitFlags(rawValue: 1 << 15)
    public static let writebackCache = FuseInitFlags(rawValue: 1 << 16)
    public static let noOpenSupport = FuseInitFlags(rawValue: 1 << 17)
    public static let parallelDirops = FuseInitFlags(rawValue: 1 << 18)
    public static let handleKillpriv = FuseInitFlags(rawValue: 1 << 19)
    public static let posixACL = FuseInitFlags(rawValue: 1 << 20)
    public static let abortError = FuseInitFlags(rawValue: 1 << 21)
    public static let maxPages = FuseInitFlags(rawValue: 1 << 22)
    public static let cacheSymlinks = FuseInitFlags(rawValue: 1 << 23)
    public static let noOpendirSupport = FuseInitFlags(rawValue: 1 << 24)
    public static let explicitInvalData = FuseInitFlags(rawValue: 1 << 25)
    public static let initExt = FuseInitFlags(rawValue: 1 << 30)
    public static let directIOAllowMmap = FuseInitFlags(rawValue: 1 << 36)
    public static let passthrough = FuseInitFlags(rawValue: 1 << 37)
    public static let noExportSupport = FuseInitFlags(rawValue: 1 << 38)
    public static let hasResend = FuseInitFlags(rawValue: 1 << 39)
    public static let overIOUring = FuseInitFlags(rawValue: 1 << 41)

    public var description: String { String(format: "0x%016llx", rawValue) }
}

/// OPEN reply flags.
public struct FuseOpenFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let directIO = FuseOpenFlags(rawValue: 1 << 0)
    public static let keepCache = FuseOpenFlags(rawValue: 1 << 1)
    public static let nonseekable = FuseOpenFlags(rawValue: 1 << 2)
    public static let cacheDir = FuseOpenFlags(rawValue: 1 << 3)
    public static let stream = FuseOpenFlags(rawValue: 1 << 4)
    public static let noFlush = FuseOpenFlags(rawValue: 1 << 5)
    public static let parallelDirectWrites = FuseOpenFlags(rawValue: 1 << 6)
    public static let passthrough = FuseOpenFlags(rawValue: 1 << 7)
}

/// SETATTR `valid` bits.
public struct FuseSetattrValid: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let mode = FuseSetattrValid(rawValue: 1 << 0)
    public static let uid = FuseSetattrValid(rawValue: 1 << 1)
    public static let gid = FuseSetattrValid(rawValue: 1 << 2)
    public static let size = FuseSetattrValid(rawValue: 1 << 3)
    public static let atime = FuseSetattrValid(rawValue: 1 << 4)
    public static let mtime = FuseSetattrValid(rawValue: 1 << 5)
    public static let fh = FuseSetattrValid(rawValue: 1 << 6)
    public static let atimeNow = FuseSetattrValid(rawValue: 1 << 7)
    public static let mtimeNow = FuseSetattrValid(rawValue: 1 << 8)
    public static let lockOwner = FuseSetattrValid(rawValue: 1 << 9)
    public static let ctime = FuseSetattrValid(rawValue: 1 << 10)
    public static let killSuidgid = FuseSetattrValid(rawValue: 1 << 11)

    /// The bits that only touch timestamps.
    public static let times: FuseSetattrValid = [.atime, .mtime, .atimeNow, .mtimeNow, .ctime]
}

/// Notification codes (sent with `unique` 0 and the code in `error`).
public enum FuseNotifyCode: Int32, Sendable {
    case invalInode = 2
    case invalEntry = 3
    case store = 4
}

/// Device ioctls (`_IOR`/`_IOW` with magic 229).
public enum FuseDeviceIoctl {
    /// `_IOR(229, 0, uint32_t)`: a new fd for the same connection.
    public static let clone: UInt = 0x8004_E500
    /// `_IOW(229, 1, struct fuse_backing_map)` (16 bytes): register a backing file.
    public static let backingOpen: UInt = 0x4010_E501
    /// `_IOW(229, 2, uint32_t)`: release a backing id.
    public static let backingClose: UInt = 0x4004_E502
}

/// What a file is, for `fuse_attr.mode` and directory entries.
public enum FuseFileType: UInt32, Sendable {
    case directory = 0o040000
    case regular = 0o100000
    case symlink = 0o120000

    /// The `d_type` of a directory entry.
    public var direntType: UInt32 {
        switch self {
        case .directory: return 4
        case .regular: return 8
        case .symlink: return 10
        }
    }
}

/// A timestamp as FUSE carries it.
public struct FuseTime: Sendable, Equatable {
    public var seconds: UInt64
    public var nanoseconds: UInt32
    public init(seconds: UInt64, nanoseconds: UInt32 = 0) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }
    /// A cache timeout given in seconds (negative or non-finite: 0).
    public init(timeout: Double) {
        guard timeout.isFinite, timeout > 0 else { self.init(seconds: 0); return }
        let whole = min(timeout.rounded(.down), Double(UInt32.max))
        self.init(seconds: UInt64(whole), nanoseconds: UInt32(((timeout - whole) * 1e9).rounded(.down).clamped(0, 999_999_999)))
    }
}

extension Double {
    func clamped(_ lo: Double, _ hi: Double) -> Double { Swift.min(hi, Swift.max(lo, self)) }
}

/// File attributes (`struct fuse_attr`).
public struct FuseAttributes: Sendable, Equatable {
    public var ino: UInt64
    public var size: UInt64 = 0
    public var blocks: UInt64 = 0
    public var atime = FuseTime(seconds: 0)
    public var mtime = FuseTime(seconds: 0)
    public var ctime = FuseTime(seconds: 0)
    /// File type bits and permission bits.
    public var mode: UInt32
    public var nlink: UInt32 = 1
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    public var blksize: UInt32 = 4096

    public init(ino: UInt64, mode: UInt32) {
        self.ino = ino
        self.mode = mode
    }
}

/// A LOOKUP/CREATE answer (`struct fuse_entry_out`). `nodeid` 0 is a
/// negative entry the kernel caches for `entryTimeout`.
public struct FuseEntry: Sendable {
    public var nodeid: UInt64
    public var generation: UInt64 = 1
    public var entryTimeout: FuseTime
    public var attrTimeout: FuseTime
    public var attributes: FuseAttributes

    public init(nodeid: UInt64, entryTimeout: Double, attrTimeout: Double, attributes: FuseAttributes) {
        self.nodeid = nodeid
        self.entryTimeout = FuseTime(timeout: entryTimeout)
        self.attrTimeout = FuseTime(timeout: attrTimeout)
        self.attributes = attributes
    }

    public static func negative(timeout: Double) -> FuseEntry {
        FuseEntry(nodeid: 0, entryTimeout: timeout, attrTimeout: 0, attributes: FuseAttributes(ino: 0, mode: 0))
    }
}

/// A STATFS answer.
public struct FuseStatfs: Sendable, Equatable {
    public var blocks: UInt64 = 0
    public var blocksFree: UInt64 = 0
    public var blocksAvailable: UInt64 = 0
    public var files: UInt64 = 0
    public var filesFree: UInt64 = 0
    public var blockSize: UInt32 = 4096
    public var nameLength: UInt32 = 255
    public var fragmentSize: UInt32 = 4096
    public init() {}
}
