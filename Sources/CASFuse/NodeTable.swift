import Synchronization

/// The nodes the kernel knows, by inode number, with the kernel's lookup
/// counts: a node goes when FORGET brings its count to zero. Split into
/// shards by inode number (the numbers are hashes), each behind its own
/// mutex, so concurrent requests rarely wait on each other.
final class NodeTable: Sendable {
    private struct Slot {
        var node: any Node
        var lookups: UInt64
    }

    private struct Shard {
        var slots: [UInt64: Slot] = [:]
        /// The most slots this shard held since it last shrank.
        var peak = 0
    }

    private final class ShardLock: Sendable {
        let mutex = Mutex(Shard())
    }

    private static let shardCount = 16
    private let shards: [ShardLock]
    private let files = Atomic<Int>(0)
    private let others = Atomic<Int>(0)

    init() {
        shards = (0..<Self.shardCount).map { _ in ShardLock() }
    }

    @inline(__always)
    private func shard(_ ino: UInt64) -> ShardLock { shards[Int(ino % UInt64(Self.shardCount))] }

    enum Remembered {
        /// The node the kernel now holds one more reference to: the one
        /// given, or the one it already held under this number.
        case node(any Node)
        /// Another thing already has this number.
        case collision(any Node)
    }

    /// Records one more kernel reference to `node` (or to the node already
    /// known under its number, which is kept with whatever it holds).
    func remember(_ node: any Node) -> Remembered {
        shard(node.ino).mutex.withLock { s in
            if var slot = s.slots[node.ino] {
                guard slot.node.isSame(as: node) else { return .collision(slot.node) }
                slot.lookups += 1
                s.slots[node.ino] = slot
                return .node(slot.node)
            }
            s.slots[node.ino] = Slot(node: node, lookups: 1)
            s.peak = max(s.peak, s.slots.count)
            if node.kind == .file { files.add(1, ordering: .relaxed) } else { others.add(1, ordering: .relaxed) }
            return .node(node)
        }
    }

    subscript(_ ino: UInt64) -> (any Node)? { shard(ino).mutex.withLock { $0.slots[ino]?.node } }

    /// Drops `n` kernel references; returns the node when that was its last.
    @discardableResult
    func forget(_ ino: UInt64, _ n: UInt64) -> (any Node)? {
        shard(ino).mutex.withLock { s in
            guard var slot = s.slots[ino] else { return nil }
            if slot.lookups <= n {
                s.slots[ino] = nil
                if slot.node.kind == .file { files.subtract(1, ordering: .relaxed) } else { others.subtract(1, ordering: .relaxed) }
                // A dictionary keeps its capacity when emptied: rebuild it
                // once it holds a quarter of what it held (memory the kernel
                // let go of goes back).
                if s.peak >= 1024, s.slots.count < s.peak / 4 {
                    s.slots = Dictionary(uniqueKeysWithValues: s.slots.map { ($0.key, $0.value) })
                    s.peak = s.slots.count
                }
                return slot.node
            }
            slot.lookups -= n
            s.slots[ino] = slot
            return nil
        }
    }

    /// File nodes held.
    var fileCount: Int { files.load(ordering: .relaxed) }
    /// Directory and symlink nodes held (those of trees).
    var otherCount: Int { others.load(ordering: .relaxed) }
}
