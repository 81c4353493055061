import CASCore
import Synchronization

/// Inode numbers of the fixed directories.
public enum FixedInode {
    public static let root: UInt64 = 1
    public static let sha256: UInt64 = 2
}

/// The inode number of a blob: derived from the hash bytes and the size, so it
/// is the same across lookups and remounts. The top bit is always set, which
/// keeps blob inodes apart from the fixed directory inodes.
public func blobInode(_ digest: Digest) -> UInt64 {
    var h: UInt64 = 0
    var it = digest.hash.utf8.makeIterator()
    for _ in 0..<16 {
        guard let c = it.next() else { break }
        let v: UInt8 = c <= UInt8(ascii: "9") ? c &- UInt8(ascii: "0") : c &- UInt8(ascii: "a") &+ 10
        h = (h << 4) | UInt64(v & 0xf)
    }
    // splitmix64 finaliser of the size, so that one hash with two sizes differs.
    var z = UInt64(bitPattern: digest.size) &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    z ^= z >> 31
    return (h ^ z) | (1 << 63)
}

/// Inode → digest for the inodes the kernel currently knows (lookup counts).
final class InodeTable: Sendable {
    private struct Entry {
        var digest: Digest
        var lookups: UInt64
    }

    private let entries = Mutex<[UInt64: Entry]>([:])

    enum RememberResult {
        case ok(UInt64)
        case collision(UInt64, Digest)
    }

    /// Records one more kernel reference to the digest's inode.
    func remember(_ digest: Digest) -> RememberResult {
        let ino = blobInode(digest)
        return entries.withLock { table in
            if var e = table[ino] {
                guard e.digest == digest else { return .collision(ino, e.digest) }
                e.lookups += 1
                table[ino] = e
            } else {
                table[ino] = Entry(digest: digest, lookups: 1)
            }
            return .ok(ino)
        }
    }

    func digest(_ ino: UInt64) -> Digest? {
        entries.withLock { $0[ino]?.digest }
    }

    func forget(_ ino: UInt64, _ n: UInt64) {
        entries.withLock { table in
            guard var e = table[ino] else { return }
            if e.lookups <= n {
                table[ino] = nil
            } else {
                e.lookups -= n
                table[ino] = e
            }
        }
    }

    var count: Int { entries.withLock { $0.count } }
}
