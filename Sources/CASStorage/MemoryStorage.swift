import CASCore
import Foundation
import Synchronization

/// A byte-bounded LRU of blobs in memory (BuildGrid's `!lru-storage`).
/// Reads and writes refresh recency; the least recently used blobs are evicted
/// when a new blob would exceed `maxBytes`.
public final class MemoryStorage: Storage, StatisticsReporting {
    public let maxBytes: Int64
    private let state: Mutex<LRU>

    public init(maxBytes: Int64) {
        self.maxBytes = maxBytes
        self.state = Mutex(LRU())
    }

    public func hasBlob(_ digest: Digest) throws -> Bool {
        digest.isEmpty || state.withLock { $0.entries[digest] != nil }
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? {
        if digest.isEmpty { return DataSource(Data()) }
        return state.withLock { lru in lru.touch(digest).map(DataSource.init) }
    }

    public func read(_ digest: Digest, offset: Int64, length: Int) throws -> Data? {
        try getBlob(digest)?.read(offset: offset, length: length)
    }

    public func deleteBlob(_ digest: Digest) throws {
        state.withLock { _ = $0.remove(digest) }
    }

    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        if digest.isEmpty { return }
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
            while lru.bytes + digest.size > maxBytes, let oldest = lru.oldest {
                lru.remove(oldest)
            }
            lru.insert(digest, data)
        }
    }

    public func statistics() -> [String: Int64] {
        state.withLock { ["memory_bytes": $0.bytes, "memory_blobs": Int64($0.entries.count), "memory_max_bytes": maxBytes] }
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
