import CASCore
import Foundation
import Synchronization

/// A byte-bounded LRU of blobs in memory (BuildGrid's `!lru-storage`).
/// Reads and writes refresh recency; the least recently used blobs are evicted
/// when a new blob would exceed `maxBytes`.
/// Only verified bytes ever enter it (the stack checks writes and fetches
/// before they reach a cache), so what it returns is marked verified.
public final class MemoryStorage: Storage {
    public let maxBytes: Int64
    private let state: Mutex<LRU>

    public init(maxBytes: Int64, metrics: MetricScope = .standalone("memory")) {
        self.maxBytes = max(0, maxBytes)
        self.state = Mutex(LRU())
        let bytes = metrics.gauge(MetricCatalog.memoryBytes)
        let blobs = metrics.gauge(MetricCatalog.memoryBlobs)
        metrics.gauge(MetricCatalog.memoryMaxBytes).set(self.maxBytes)
        metrics.metrics.onCollect { [weak self] in
            guard let self else { return }
            let (b, n) = state.withLock { ($0.bytes, $0.entries.count) }
            bytes.set(b)
            blobs.set(Int64(n))
        }
    }

    /// Bytes held now.
    public var usedBytes: Int64 { state.withLock { $0.bytes } }

    public func hasBlob(_ digest: Digest) throws -> Bool {
        state.withLock { $0.entries[digest] != nil }
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? {
        state.withLock { lru in lru.touch(digest).map { DataSource($0, verified: true) } }
    }

    public func deleteBlob(_ digest: Digest) throws {
        state.withLock { _ = $0.remove(digest) }
    }

    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        guard digest.size <= maxBytes else {
            throw StorageError.storageFull("blob \(digest) is larger than the memory cache (\(maxBytes) bytes)")
        }
        if state.withLock({ $0.touch(digest) != nil }) { return }
        let data = try source.readAll()
        guard Int64(data.count) == digest.size else {
            throw StorageError.sizeMismatch(expected: digest, actualSize: Int64(data.count))
        }
        state.withLock { lru in
            guard lru.entries[digest] == nil else { return }
            while lru.bytes.saturatingAdd(digest.size) > maxBytes, let oldest = lru.oldest {
                lru.remove(oldest)
            }
            lru.insert(digest, data)
        }
    }
}

/// An LRU list threaded through a dictionary: each entry knows its neighbours.
private struct LRU {
    struct Entry {
        var data: Data
        var newer: Digest?
        var older: Digest?
    }

    var entries: [Digest: Entry] = [:]
    var newest: Digest?
    var oldest: Digest?
    var bytes: Int64 = 0

    /// Returns the data and marks the entry most recently used.
    mutating func touch(_ d: Digest) -> Data? {
        guard let e = entries[d] else { return nil }
        if newest != d {
            unlink(d, e)
            linkNewest(d)
        }
        return e.data
    }

    mutating func insert(_ d: Digest, _ data: Data) {
        entries[d] = Entry(data: data)
        bytes += Int64(data.count)
        linkNewest(d)
    }

    @discardableResult
    mutating func remove(_ d: Digest) -> Bool {
        guard let e = entries[d] else { return false }
        unlink(d, e)
        entries[d] = nil
        bytes -= Int64(e.data.count)
        return true
    }

    private mutating func unlink(_ d: Digest, _ e: Entry) {
        if let n = e.newer { entries[n]?.older = e.older } else { newest = e.older }
        if let o = e.older { entries[o]?.newer = e.newer } else { oldest = e.newer }
        entries[d]?.newer = nil
        entries[d]?.older = nil
    }

    private mutating func linkNewest(_ d: Digest) {
        entries[d]?.older = newest
        entries[d]?.newer = nil
        if let n = newest { entries[n]?.newer = d }
        newest = d
        if oldest == nil { oldest = d }
    }
}
