import CASCore
import Foundation
import Redis

/// Which blobs cleanup takes first.
public enum CleanupOrder: Sendable {
    /// Least recently used first, over the whole index (casfs's default).
    case leastRecentlyUsed
    /// The order Redis's SCAN returns keys in, resuming where the last call
    /// stopped: what BuildGrid's RedisIndex does.
    case scan
}

/// What makes a blob eligible for cleanup, as in BuildGrid's janitor: last
/// accessed at or before `protectBlobsAfter`, or larger than
/// `largeBlobThreshold` and last accessed at or before `largeBlobLifetime`.
public struct CleanupRules: Sendable {
    /// nil: the moment cleanup starts (every blob accessed before is eligible).
    public var protectBlobsAfter: Date?
    public var largeBlobThreshold: Int64?
    public var largeBlobLifetime: Date?

    public init(protectBlobsAfter: Date? = nil, largeBlobThreshold: Int64? = nil, largeBlobLifetime: Date? = nil) {
        self.protectBlobsAfter = protectBlobsAfter
        self.largeBlobThreshold = largeBlobThreshold
        self.largeBlobLifetime = largeBlobLifetime
    }

    func eligible(_ d: Digest, lastAccess: Date, now: Date) -> Bool {
        if lastAccess <= (protectBlobsAfter ?? now) { return true }
        guard let t = largeBlobThreshold, let l = largeBlobLifetime else { return false }
        return d.size > t && lastAccess <= l
    }
}

extension RedisIndex {
    /// Last access implied by a PTTL reply: now − (lifetime − TTL left).
    /// A key without expiry (-1) counts as accessed a whole lifetime ago, as in BuildGrid.
    static func lastAccess(pttl: Int64, now: Date) -> Date {
        let left = pttl < 0 ? 0 : min(Double(pttl) / 1000, Double(ttlSeconds))
        return now.addingTimeInterval(-(Double(ttlSeconds) - left))
    }

    /// Deletes eligible blobs until about `n` bytes are gone, in `order`.
    /// Returns the bytes deleted (with `dryRun`, those that would be; nothing
    /// changes); `onDelete` is told each digest deleted (or that would be), in
    /// the order of deletion.
    public func deleteNBytes(
        _ n: Int64, order: CleanupOrder = .leastRecentlyUsed, dryRun: Bool = false,
        rules: CleanupRules = CleanupRules(), onDelete: ((Digest) -> Void)? = nil
    ) throws -> Int64 {
        guard n > 0 else { return 0 }
        switch order {
        case .scan: return try deleteInScanOrder(n, dryRun: dryRun, rules: rules, onDelete: onDelete)
        case .leastRecentlyUsed: return try deleteLeastRecentlyUsed(n, dryRun: dryRun, rules: rules, onDelete: onDelete)
        }
    }

    /// A blob seen by the walk: its digest and the PTTL it had.
    struct Candidate {
        var digest: Digest
        var pttl: Int64
    }

    /// Walks every key, keeping only the oldest eligible blobs that cover `n`
    /// bytes (a heap ordered newest-first, trimmed as the walk goes: memory
    /// grows with what is deleted, not with the store), then deletes them
    /// oldest first.
    func deleteLeastRecentlyUsed(_ n: Int64, dryRun: Bool, rules: CleanupRules, onDelete: ((Digest) -> Void)?) throws -> Int64 {
        let now = Date()
        var heap = NewestFirstHeap()
        var cursor: UInt64 = 0
        var seen = Set<Digest>()
        repeat {
            let (next, keys) = try scanPage(cursor: cursor, count: RedisIndex.scanCount)
            cursor = next
            let page = keys.compactMap { digest(fromKey: $0) }
            let ttls = try runPerKey(page, "PTTL")
            for (d, r) in zip(page, ttls) {
                guard let pttl = try? r.integerValue(), pttl != -2 else { continue }  // gone meanwhile
                guard rules.eligible(d, lastAccess: RedisIndex.lastAccess(pttl: pttl, now: now), now: now) else { continue }
                guard seen.insert(d).inserted else { continue }
                heap.push(Candidate(digest: d, pttl: pttl < 0 ? -1 : pttl))
                // Drop the newest while the rest still covers n bytes.
                while let top = heap.top, heap.bytes.saturatingSubtract(top.digest.size) >= n {
                    seen.remove(heap.pop()!.digest)
                }
            }
        } while cursor != 0
        let ordered = heap.drainOldestFirst()
        if dryRun {
            ordered.forEach { onDelete?($0.digest) }
            return ordered.map(\.digest.size).saturatingSum()
        }
        var deleted: Int64 = 0
        var i = 0
        while i < ordered.count {
            let batch = Array(ordered[i..<min(ordered.count, i + RedisIndex.scanCount)])
            i += batch.count
            deleted = deleted.saturatingAdd(try deleteIfUnused(batch, onDelete: onDelete))
        }
        return deleted
    }

    /// Removes the keys of `batch` whose TTL has not been refreshed since the
    /// walk saw them (one script, atomic per key), then their bytes.
    private func deleteIfUnused(_ batch: [Candidate], onDelete: ((Digest) -> Void)?) throws -> Int64 {
        var args: [RedisArgument] = ["EVAL", .string(RedisIndex.deleteIfUnusedScript), .integer(Int64(batch.count))]
        args += batch.map { keyArgument($0.digest) }
        args += batch.map { .integer($0.pttl) }
        guard case .array(let items) = try run(args) else {
            throw StorageError.unavailable("redis index: unexpected reply to the cleanup script")
        }
        var removed: [Digest] = []
        for item in items {
            guard let i = try? item.integerValue(), i >= 1, i <= Int64(batch.count) else { continue }
            removed.append(batch[Int(i) - 1].digest)
        }
        try lowerTotal(by: removed)
        adjustCount(-removed.count)
        return finishEviction(removed, onDelete: onDelete)
    }

    /// For each key: delete it if its PTTL is still at most the one the walk
    /// saw (a read or write since would have raised it). Returns the
    /// 1-based positions deleted.
    static let deleteIfUnusedScript = """
        local out = {}
        for i, k in ipairs(KEYS) do
          local t = redis.call('PTTL', k)
          if t ~= -2 and t <= tonumber(ARGV[i]) then
            redis.call('DEL', k)
            out[#out + 1] = i
          end
        end
        return out
        """

    /// Deletes the bytes of blobs whose keys were removed; returns the bytes gone.
    private func finishEviction(_ removed: [Digest], onDelete: ((Digest) -> Void)?) -> Int64 {
        let failed = Set(removeBytes(removed))
        var bytes: Int64 = 0
        var count = 0
        for d in removed where !failed.contains(d.hash) {
            onDelete?(d)
            bytes = bytes.saturatingAdd(d.size)
            count += 1
        }
        counters.evictedBlobs.add(count)
        counters.evictedBytes.add(bytes)
        return bytes
    }

    /// BuildGrid's order: SCAN pages from where the previous call stopped.
    func deleteInScanOrder(_ n: Int64, dryRun: Bool, rules: CleanupRules, onDelete: ((Digest) -> Void)?) throws -> Int64 {
        let now = Date()
        var remaining = n
        var deletedBytes: Int64 = 0
        var seen = Set<Digest>()
        while remaining > 0 {
            let previous = deleteCursor.withLock { $0 }
            let (next, keys) = try scanPage(cursor: previous, count: RedisIndex.scanCount)
            var cursor = next
            let page = keys.compactMap { digest(fromKey: $0) }
            let ttls = try runPerKey(page, "PTTL")
            var candidates: [Candidate] = []
            for (d, r) in zip(page, ttls) {
                guard let pttl = try? r.integerValue(), pttl != -2 else { continue }
                guard seen.insert(d).inserted else { continue }
                if remaining <= 0 {
                    cursor = previous  // the rest of this page is looked at next time
                    break
                }
                if rules.eligible(d, lastAccess: RedisIndex.lastAccess(pttl: pttl, now: now), now: now) {
                    remaining = remaining.saturatingSubtract(d.size)
                    candidates.append(Candidate(digest: d, pttl: pttl < 0 ? -1 : pttl))
                }
            }
            deleteCursor.withLock { $0 = cursor }
            if dryRun {
                candidates.forEach { onDelete?($0.digest) }
                deletedBytes = deletedBytes.saturatingAdd(candidates.map(\.digest.size).saturatingSum())
            } else if !candidates.isEmpty {
                deletedBytes = deletedBytes.saturatingAdd(try deleteIfUnused(candidates, onDelete: onDelete))
            }
            if cursor == 0 { break }
        }
        return deletedBytes
    }

    /// Up to `limit` digests, least recently accessed first.
    public func leastRecentDigests(limit: Int) throws -> [Digest] {
        guard limit > 0 else { return [] }
        var all: [Candidate] = []
        var cursor: UInt64 = 0
        var seen = Set<Digest>()
        repeat {
            let (next, keys) = try scanPage(cursor: cursor, count: RedisIndex.scanCount)
            cursor = next
            let page = keys.compactMap { digest(fromKey: $0) }
            for (d, r) in zip(page, try runPerKey(page, "PTTL")) {
                guard let pttl = try? r.integerValue(), pttl != -2, seen.insert(d).inserted else { continue }
                all.append(Candidate(digest: d, pttl: pttl < 0 ? -1 : pttl))
            }
            if all.count > 2 * limit + RedisIndex.scanCount {
                all.sort(by: NewestFirstHeap.olderFirst)
                all.removeLast(all.count - limit)
            }
        } while cursor != 0
        all.sort(by: NewestFirstHeap.olderFirst)
        return all.prefix(limit).map(\.digest)
    }
}

/// A binary max-heap of candidates by recency (the most recently used on
/// top), with the sum of their sizes.
struct NewestFirstHeap {
    private var items: [RedisIndex.Candidate] = []
    private(set) var bytes: Int64 = 0

    /// Older (smaller TTL left) first; ties broken by digest for a stable order.
    static func olderFirst(_ a: RedisIndex.Candidate, _ b: RedisIndex.Candidate) -> Bool {
        a.pttl == b.pttl ? a.digest < b.digest : a.pttl < b.pttl
    }

    var top: RedisIndex.Candidate? { items.first }
    var count: Int { items.count }

    mutating func push(_ c: RedisIndex.Candidate) {
        items.append(c)
        bytes = bytes.saturatingAdd(c.digest.size)
        var i = items.count - 1
        while i > 0 {
            let p = (i - 1) / 2
            guard Self.olderFirst(items[p], items[i]) else { break }
            items.swapAt(p, i)
            i = p
        }
    }

    mutating func pop() -> RedisIndex.Candidate? {
        guard !items.isEmpty else { return nil }
        items.swapAt(0, items.count - 1)
        let out = items.removeLast()
        bytes = bytes.saturatingSubtract(out.digest.size)
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < items.count, Self.olderFirst(items[m], items[l]) { m = l }
            if r < items.count, Self.olderFirst(items[m], items[r]) { m = r }
            if m == i { break }
            items.swapAt(i, m)
            i = m
        }
        return out
    }

    mutating func drainOldestFirst() -> [RedisIndex.Candidate] {
        let out = items.sorted(by: Self.olderFirst)
        items = []
        bytes = 0
        return out
    }
}
