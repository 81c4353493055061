import CASCore
import Foundation
import Synchronization

/// A byte-bounded LRU of blobs in memory (BuildGrid's `!lru-storage`).
/// Reads and writes refresh recency; the least recently used blobs are evicted
/// when a new blob would exceed `maxBytes`.
/// Only verified bytes ever enter it (the stack checks writes and fetches
/// before they reach a cache), so what it returns is marked verified.
///
/// `maxBytes` bounds all the memory the storage's blobs take, not only what
/// the LRU lists: a blob being read in counts from before its first byte is
/// read (its room is made first), and an evicted blob that a reader still
/// holds counts until that reader lets it go. Eviction passes over blobs
/// that readers hold (evicting them would free nothing) and evicts only when
/// that makes enough room. When no room can be made (readers hold the rest;
/// by default the write does not wait for them, `admissionWait`), the write
/// fails (`storageFull`): a cache in front of a fallback then serves the
/// blob from the fallback without keeping it, and a write goes to the
/// fallback alone.
public final class MemoryStorage: Storage, CapacityBounded {
    public let maxBytes: Int64
    /// How long a write waits for readers to let go of evicted blobs.
    public let admissionWait: Double
    private let state: Mutex<LRU>
    /// Bytes of every blob buffer alive (listed, or evicted and still read)
    /// plus the room reserved for blobs being read in.
    let committed = Atomic<Int64>(0)

    public init(maxBytes: Int64, admissionWait: Double = 0, metrics: MetricScope = .standalone("memory")) {
        self.maxBytes = max(0, maxBytes)
        self.admissionWait = max(0, admissionWait)
        self.state = Mutex(LRU())
        let bytes = metrics.gauge(MetricCatalog.memoryBytes)
        let blobs = metrics.gauge(MetricCatalog.memoryBlobs)
        metrics.gauge(MetricCatalog.memoryMaxBytes).set(self.maxBytes)
        metrics.metrics.onCollect { [weak self] in
            guard let self else { return }
            let n = state.withLock { $0.entries.count }
            bytes.set(heldBytes)
            blobs.set(Int64(n))
        }
    }

    public var capacity: Int64 { maxBytes }

    /// Bytes the LRU lists now.
    public var usedBytes: Int64 { state.withLock { $0.bytes } }

    /// Bytes of blobs in memory: listed, evicted but still read, or being read in.
    public var heldBytes: Int64 { committed.load(ordering: .relaxed) }

    public func hasBlob(_ digest: Digest) throws -> Bool {
        state.withLock { $0.entries[digest] != nil }
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? {
        state.withLock { lru in lru.touch(digest).map { MemoryBlobSource($0) } }
    }

    public func deleteBlob(_ digest: Digest) throws {
        let gone = state.withLock { $0.remove(digest) }
        _ = gone  // released here, outside the lock
    }

    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        guard digest.size <= maxBytes else {
            throw StorageError.storageFull("blob \(digest) is larger than the memory cache (\(maxBytes) bytes)")
        }
        if state.withLock({ $0.touch(digest) != nil }) { return }
        try reserve(digest.size)
        let data: Data
        do {
            data = try source.readAll()
        } catch {
            committed.subtract(digest.size, ordering: .relaxed)
            throw error
        }
        guard Int64(data.count) == digest.size else {
            committed.subtract(digest.size, ordering: .relaxed)
            throw StorageError.sizeMismatch(expected: digest, actualSize: Int64(data.count))
        }
        // The buffer takes over the reservation and gives it back when it goes.
        let buffer = MemoryBuffer(data, owner: self)
        let displaced = state.withLock { lru -> MemoryBuffer? in
            guard lru.entries[digest] == nil else { return buffer }
            lru.insert(digest, buffer)
            return nil
        }
        _ = displaced  // a copy stored meanwhile stays; this one is released here
    }

    /// Makes room for `size` bytes and reserves it: evicts the least
    /// recently used blobs that no reader holds (their memory goes at once),
    /// only if that makes enough room; otherwise nothing is evicted and,
    /// after up to `admissionWait` of trying again, the write is refused.
    private func reserve(_ size: Int64) throws {
        let deadline = Date().addingTimeInterval(admissionWait)
        while true {
            var evicted: [MemoryBuffer] = []
            let reserved = state.withLock { lru -> Bool in
                let now = committed.load(ordering: .relaxed)
                if now.saturatingAdd(size) <= maxBytes {
                    committed.add(size, ordering: .relaxed)
                    return true
                }
                let need = now.saturatingAdd(size).saturatingSubtract(maxBytes)
                var plan: [Digest] = []
                var freeable: Int64 = 0
                var cursor = lru.oldest
                while let d = cursor, freeable < need, let e = lru.entries[d] {
                    if e.buffer.readers.load(ordering: .relaxed) == 0 {
                        plan.append(d)
                        freeable += e.buffer.size
                    }
                    cursor = e.newer
                }
                guard freeable >= need else { return false }
                evicted = plan.compactMap { lru.remove($0) }
                return false
            }
            if reserved { return }
            if !evicted.isEmpty {
                // Released here, outside the lock: their room is free for the next try.
                evicted.removeAll()
                continue
            }
            guard Date() < deadline else {
                throw StorageError.storageFull("memory cache of \(maxBytes) bytes has no room now: \(heldBytes) bytes are held by readers and by blobs being stored")
            }
            usleep(5_000)
        }
    }
}

/// One blob's bytes in memory; its size is counted against the storage's
/// budget for as long as anything (the LRU, a reader) holds it.
final class MemoryBuffer: @unchecked Sendable {
    let data: Data
    let size: Int64
    /// Open sources reading it: while any is, eviction leaves it listed.
    let readers = Atomic<Int>(0)
    private weak var owner: MemoryStorage?

    init(_ data: Data, owner: MemoryStorage) {
        self.data = data
        self.size = Int64(data.count)
        self.owner = owner
    }

    deinit {
        owner?.committed.subtract(size, ordering: .relaxed)
        MallocTuning.noteFreed(size)
    }
}

/// A blob read from memory: holds its buffer while open.
final class MemoryBlobSource: BlobSource, @unchecked Sendable {
    let buffer: MemoryBuffer
    init(_ buffer: MemoryBuffer) {
        self.buffer = buffer
        buffer.readers.add(1, ordering: .relaxed)
    }

    deinit { buffer.readers.subtract(1, ordering: .relaxed) }

    var size: Int64 { buffer.size }
    var isVerified: Bool { true }

    func read(offset: Int64, length: Int) throws -> Data {
        guard offset >= 0, length >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        let data = buffer.data
        let start = Int(min(offset, Int64(data.count)))
        let end = min(start + length, data.count)
        let base = data.startIndex
        return data.subdata(in: (base + start)..<(base + end))
    }

    func read(into out: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        guard offset >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        let data = buffer.data
        let start = Int(min(offset, Int64(data.count)))
        let n = min(out.count, data.count - start)
        guard n > 0 else { return 0 }
        let base = data.startIndex + start
        data.copyBytes(to: out, from: base..<(base + n))
        return n
    }
}

/// An LRU list threaded through a dictionary: each entry knows its neighbours.
private struct LRU {
    struct Entry {
        var buffer: MemoryBuffer
        var newer: Digest?
        var older: Digest?
    }

    var entries: [Digest: Entry] = [:]
    var newest: Digest?
    var oldest: Digest?
    var bytes: Int64 = 0

    /// Returns the buffer and marks the entry most recently used.
    mutating func touch(_ d: Digest) -> MemoryBuffer? {
        guard let e = entries[d] else { return nil }
        if newest != d {
            unlink(d, e)
            linkNewest(d)
        }
        return e.buffer
    }

    mutating func insert(_ d: Digest, _ buffer: MemoryBuffer) {
        entries[d] = Entry(buffer: buffer)
        bytes += buffer.size
        linkNewest(d)
    }

    /// Unlists `d`; returns its buffer (for the caller to release outside any lock).
    mutating func remove(_ d: Digest) -> MemoryBuffer? {
        guard let e = entries[d] else { return nil }
        unlink(d, e)
        entries[d] = nil
        bytes -= e.buffer.size
        return e.buffer
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
