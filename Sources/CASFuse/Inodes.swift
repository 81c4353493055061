import CASCore
import CASTree

/// Inode numbers of the fixed directories.
public enum FixedInode {
    public static let root: UInt64 = 1
    public static let sha256: UInt64 = 2
    public static let tree: UInt64 = 3

    static func contains(_ ino: UInt64) -> Bool { ino >= root && ino <= tree }
}

/// splitmix64's finaliser: spreads the bits of one word.
@inline(__always)
func mix64(_ x: UInt64) -> UInt64 {
    var z = x &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}

/// The inode number of a blob: derived from the hash bytes and the size, so it
/// is the same across lookups and remounts. The top bit is always set, which
/// keeps blob inodes apart from the fixed directory inodes and tree nodes.
public func blobInode(_ digest: Digest) -> UInt64 {
    var h: UInt64 = 0
    var it = digest.hash.utf8.makeIterator()
    for _ in 0..<16 {
        guard let c = it.next() else { break }
        let v: UInt8 = c <= UInt8(ascii: "9") ? c &- UInt8(ascii: "0") : c &- UInt8(ascii: "a") &+ 10
        h = (h << 4) | UInt64(v & 0xf)
    }
    // Mix in the size, so that one hash with two sizes differs.
    return (h ^ mix64(UInt64(bitPattern: digest.size))) | (1 << 63)
}

/// How a file inside a tree differs from the plain blob: executable, or
/// carrying REAPI node properties. One inode cannot show two modes, so such a
/// file gets its own inode (shared by every tree that has the same variant);
/// a plain tree file is the blob's own inode and shares its page cache.
public struct FileVariant: Hashable, Sendable {
    /// Permission bits.
    public var mode: UInt32
    public var mtime: TreeTime?

    /// nil for a plain, non-executable file without properties.
    public init?(executable: Bool, properties: TreeNodeProperties) {
        guard executable || !properties.isEmpty else { return nil }
        mode = properties.mode ?? (executable ? 0o555 : 0o444)
        mtime = properties.mtime
    }

    var inodeSalt: UInt64 {
        var h = mix64(UInt64(mode) | 0x1_0000_0000)
        if let mtime {
            h = mix64(h ^ UInt64(bitPattern: mtime.seconds))
            h = mix64(h ^ UInt64(UInt32(bitPattern: mtime.nanos)))
        }
        return h
    }
}

/// The inode of a file: the blob's own, or a variant's (still top bit set).
public func fileInode(_ digest: Digest, _ variant: FileVariant?) -> UInt64 {
    let base = blobInode(digest)
    guard let variant else { return base }
    return (base ^ variant.inodeSalt) | (1 << 63)
}

/// The inode of a directory or symlink inside a tree: derived from the path
/// (parent inode + name), never from a digest (the same subtree can appear
/// at several places, and the kernel cannot give one directory inode two
/// parents). Bit 62 set, bit 63 clear: apart from blobs and the fixed
/// inodes, and known before any lookup (a listing reports it).
func treeNodeInode(parent: UInt64, name: some Collection<UInt8>) -> UInt64 {
    var h = mix64(parent)
    var word: UInt64 = 0, n = 0
    for b in name {
        word = (word << 8) | UInt64(b)
        n += 1
        if n == 8 {
            h = mix64(h ^ word)
            word = 0
            n = 0
        }
    }
    h = mix64(h ^ word ^ (UInt64(name.count) << 56))
    return (h & ~(UInt64(3) << 62)) | (1 << 62)
}
