import CASCore
import Foundation

/// Blobs spread over named shards with BuildGrid's `!sharded-storage` choice,
/// so casfs and BuildGrid put every blob in the same shard: rendezvous
/// hashing where each shard scores `MurmurHash3_x86_32(name + "\t" + hash)`
/// (seed 0, unsigned, over UTF-8) and the lowest score wins; a tie goes to
/// the shard listed first. The size is not used. Adding a shard only moves
/// blobs onto the new one.
public final class ShardedStorage: DigestRouting {
    public struct Shard: Sendable {
        public let name: String
        public let storage: any Storage
        public init(name: String, storage: any Storage) {
            self.name = name
            self.storage = storage
        }
    }

    public let shards: [Shard]
    public let children: [any Storage]
    public let fanOut: FanOut
    /// Each shard's name and a tab, ready to be followed by a hash.
    private let prefixes: [[UInt8]]

    /// `threadPoolSize`: shard calls of one bulk operation run at the same
    /// time, at most this many at once; 0 runs them one after another.
    public init(shards: [Shard], threadPoolSize: Int) throws {
        guard !shards.isEmpty else { throw StorageError.unsupported("a sharded storage needs at least one shard") }
        var names: Set<String> = []
        for s in shards {
            guard ShardedStorage.isValidName(s.name) else {
                throw StorageError.unsupported("shard name '\(s.name)' may hold only letters, digits and '-'")
            }
            guard names.insert(s.name).inserted else { throw StorageError.unsupported("duplicate shard name '\(s.name)'") }
        }
        self.shards = shards
        self.children = shards.map(\.storage)
        self.fanOut = FanOut(width: threadPoolSize, label: "casfs.sharded")
        self.prefixes = shards.map { Array($0.name.utf8) + [0x09] }
    }

    /// BuildGrid's pattern for shard names: `^[A-Za-z0-9-]*$`.
    public static func isValidName(_ name: String) -> Bool {
        name.utf8.allSatisfy { c in
            (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) || (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z"))
                || (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) || c == UInt8(ascii: "-")
        }
    }

    /// A shard's score for a hash (lower wins).
    public static func score(shard name: String, hash: String) -> UInt32 {
        murmurHash3x86_32(name + "\t" + hash)
    }

    public func childIndex(for d: Digest) -> Int {
        var best = 0
        var bestScore = UInt32.max
        var key: [UInt8] = []
        for (i, prefix) in prefixes.enumerated() {
            key.removeAll(keepingCapacity: true)
            key.append(contentsOf: prefix)
            key.append(contentsOf: d.hash.utf8)
            let score = murmurHash3x86_32(key)
            // Strictly lower: on a tie the earlier shard stays chosen.
            if i == 0 || score < bestScore {
                best = i
                bestScore = score
            }
        }
        return best
    }

    /// The name of the shard that holds `digest`.
    public func shardName(for d: Digest) -> String { shards[childIndex(for: d)].name }
}
