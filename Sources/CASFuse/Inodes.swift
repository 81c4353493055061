import CASCore
import CASTree
import Synchronization

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

/// Inode → value for the inodes the kernel currently knows, with the kernel's
/// lookup counts: an entry goes when FORGET brings its count to zero.
final class LookupTable<Value: Equatable & Sendable>: Sendable {
    private struct Entry {
        var value: Value
        var lookups: UInt64
    }

    private let entries = Mutex<[UInt64: Entry]>([:])

    /// Records one more kernel reference. On an inode collision (another
    /// value already has this number) returns that value and records nothing.
    func remember(_ ino: UInt64, _ value: Value) -> Value? {
        entries.withLock { table in
            if var e = table[ino] {
                guard e.value == value else { return e.value }
                e.lookups += 1
                table[ino] = e
            } else {
                table[ino] = Entry(value: value, lookups: 1)
            }
            return nil
        }
    }

    subscript(_ ino: UInt64) -> Value? { entries.withLock { $0[ino]?.value } }

    /// Drops `n` kernel references; true when the inode is gone.
    @discardableResult
    func forget(_ ino: UInt64, _ n: UInt64) -> Bool {
        entries.withLock { table in
            guard var e = table[ino] else { return false }
            if e.lookups <= n {
                table[ino] = nil
                return true
            }
            e.lookups -= n
            table[ino] = e
            return false
        }
    }

    var count: Int { entries.withLock { $0.count } }
}

/// Inode → file (blob digest and tree variant) for the file inodes the kernel knows.
final class InodeTable: Sendable {
    struct File: Equatable, Sendable {
        var digest: Digest
        var variant: FileVariant?
    }

    private let table = LookupTable<File>()

    enum RememberResult {
        case ok(UInt64)
        case collision(UInt64, Digest)
    }

    /// Records one more kernel reference to the file's inode.
    func remember(_ digest: Digest, _ variant: FileVariant? = nil) -> RememberResult {
        let ino = fileInode(digest, variant)
        if let other = table.remember(ino, File(digest: digest, variant: variant)) { return .collision(ino, other.digest) }
        return .ok(ino)
    }

    func digest(_ ino: UInt64) -> Digest? { table[ino]?.digest }
    func file(_ ino: UInt64) -> File? { table[ino] }
    @discardableResult
    func forget(_ ino: UInt64, _ n: UInt64) -> Bool { table.forget(ino, n) }
    var count: Int { table.count }
}

/// Directories and symlinks inside trees. Each gets an inode per path (parent
/// inode + name), never per digest: the same subtree can appear at several
/// places, and the kernel cannot give one directory inode two parents. The
/// number is derived from the path (bit 62 set, bit 63 clear), so a listing
/// can report it before any lookup.
final class TreeInodes: Sendable {
    enum Kind: Equatable, Sendable {
        case directory(Digest)
        case symlink(String)
    }

    struct Node: Equatable, Sendable {
        var kind: Kind
        var parent: UInt64
        var name: [UInt8]
        var mode: UInt32
        var mtime: TreeTime?
        var nlink: Int
    }

    private let table = LookupTable<Node>()

    static func inode(parent: UInt64, name: some Collection<UInt8>) -> UInt64 {
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

    static func isTreeNode(_ ino: UInt64) -> Bool { ino >> 62 == 1 }

    /// Records one more kernel reference; nil on an inode collision.
    func remember(_ node: Node) -> UInt64? {
        let ino = Self.inode(parent: node.parent, name: node.name)
        return table.remember(ino, node) == nil ? ino : nil
    }

    func node(_ ino: UInt64) -> Node? {
        guard Self.isTreeNode(ino) else { return nil }
        return table[ino]
    }

    func forget(_ ino: UInt64, _ n: UInt64) { table.forget(ino, n) }
    var count: Int { table.count }
}
