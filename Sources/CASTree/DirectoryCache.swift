import CASCore
import Foundation
import Synchronization

/// What loading a Directory blob gave.
public enum DirectoryLoad: Sendable {
    case directory(TreeDirectory)
    /// The blob is not in the store (it may be written later).
    case absent
    /// The blob is there but is not a valid Directory. Content-addressed, so
    /// this never changes for the digest.
    case invalid(TreeError)
}

/// Parsed Directory messages by digest, read through a `Storage` and kept in
/// an LRU bounded by the size of the blobs they came from. Invalid blobs are
/// remembered too (their content cannot change); absent ones are not.
public final class DirectoryCache: Sendable {
    private let storage: any Storage
    private let capacity: Int64

    private struct Slot {
        var load: DirectoryLoad
        var cost: Int64
        var stamp: UInt64
        var prefetched = false
    }

    private struct State {
        var slots: [Digest: Slot] = [:]
        var bytes: Int64 = 0
        var clock: UInt64 = 0
    }

    private let state = Mutex(State())
    private let hits: MetricCounter
    private let loads: MetricCounter
    private let parsed: (@Sendable (Int) -> Void)?

    /// - Parameters:
    ///   - capacity: bytes of Directory blobs to keep parsed.
    ///   - parsed: told the number of entries of each Directory parsed (the
    ///     parse's transient memory is freed again).
    public init(storage: any Storage, capacity: Int64 = 32 << 20, metrics: Metrics = Metrics(),
                parsed: (@Sendable (Int) -> Void)? = nil) {
        self.storage = storage
        self.capacity = capacity
        self.parsed = parsed
        hits = metrics.counter(MetricCatalog.treeHits)
        loads = metrics.counter(MetricCatalog.treeLoads)
        let cached = metrics.gauge(MetricCatalog.treeCached)
        let bytes = metrics.gauge(MetricCatalog.treeCachedBytes)
        metrics.onCollect { [weak self] in
            guard let self else { return }
            let (n, b) = state.withLock { ($0.slots.count, $0.bytes) }
            cached.set(Int64(n))
            bytes.set(b)
        }
    }

    /// The Directory with this digest. Storage errors are thrown.
    public func load(_ digest: Digest) throws -> DirectoryLoad {
        if let hit = state.withLock({ s -> DirectoryLoad? in
            guard var slot = s.slots[digest] else { return nil }
            s.clock += 1
            slot.stamp = s.clock
            s.slots[digest] = slot
            return slot.load
        }) {
            hits.add()
            return hit
        }
        let result: DirectoryLoad
        if digest.size > TreeDirectory.maxBlobSize {
            result = .invalid(.tooLarge(digest.size))
        } else {
            guard let source = try storage.getBlob(digest) else { return .absent }
            let bytes = try source.readAll()
            guard Int64(bytes.count) == digest.size else {
                throw StorageError.sizeMismatch(expected: digest, actualSize: Int64(bytes.count))
            }
            do {
                let d = try TreeDirectory(parsing: bytes)
                parsed?(d.entries.count)
                result = .directory(d)
            } catch {
                result = .invalid(error)
            }
        }
        insert(digest, result)
        return result
    }

    private func insert(_ digest: Digest, _ load: DirectoryLoad) {
        // What the parsed form holds in memory; an invalid one, its error.
        var cost: Int64 = 256
        if case .directory(let d) = load { cost = Int64(d.memoryCost) }
        loads.add()
        state.withLock { s in
            if let old = s.slots[digest] { s.bytes -= old.cost }
            s.clock += 1
            s.slots[digest] = Slot(load: load, cost: cost, stamp: s.clock)
            s.bytes += cost
            guard s.bytes > capacity, s.slots.count > 1 else { return }
            // Evict the least recently used until under capacity (keeping the new one).
            let order = s.slots.sorted { $0.value.stamp < $1.value.stamp }
            for (d, slot) in order where s.bytes > capacity / 4 * 3 && d != digest {
                s.slots[d] = nil
                s.bytes -= slot.cost
            }
        }
    }

    /// True the first time it is called for a cached directory (until it is
    /// evicted): callers use it to hint a prefetch of its files once.
    public func firstUse(_ digest: Digest) -> Bool {
        state.withLock { s in
            guard var slot = s.slots[digest], !slot.prefetched else { return false }
            slot.prefetched = true
            s.slots[digest] = slot
            return true
        }
    }

    public var count: Int { state.withLock { $0.slots.count } }
}
