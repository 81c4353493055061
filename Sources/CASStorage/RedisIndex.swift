import CASCore
import Foundation
import Logging
import Redis
import Synchronization

private let indexLog = Logger(label: "casfs.redis-index")

/// An index of blobs in Redis in front of a storage, key-compatible with
/// BuildGrid's RedisIndex so both can share one Redis and one disk store.
///
/// Schema (BuildGrid's): one key `<prefix>:<hash>_<size>` per blob, value `1`,
/// TTL 365 days; the time since the last access is `365 d - TTL left`. The total
/// size is kept in `total_size` (default prefix) or `<prefix>:total_size`.
/// Nothing else is stored: the least-recently-used order is read from the
/// keys' remaining TTLs in milliseconds (PTTL), so blobs written by a BuildGrid
/// server are ordered and aged like casfs's own.
public final class RedisIndex: Storage, BlobIndex, StatisticsReporting {
    /// BuildGrid's default key prefix. It cannot be configured explicitly.
    public static let defaultPrefix = "A"
    /// Lifetime of an index entry after its last access: 365 days.
    public static let ttlSeconds: Int64 = 31_536_000
    /// SCAN page size used by `deleteNBytes` and `leastRecentDigests`.
    public static let scanCount = 1000

    public let redis: RedisPool
    public let storage: any Storage
    public let prefix: String
    /// The key of the total size counter.
    public let totalSizeKey: String

    private let keyHead: [UInt8]
    private let matchPattern: String
    private let ttlArgument = RedisArgument.string(String(RedisIndex.ttlSeconds))
    private let deleteCursor = Mutex<UInt64>(0)

    private let orphansRemoved = Atomic<Int64>(0)
    private let blobsEvicted = Atomic<Int64>(0)
    private let bytesEvicted = Atomic<Int64>(0)
    private let blobsIndexed = Atomic<Int64>(0)

    /// `prefix` nil (or empty) means BuildGrid's default `A`; an explicit `A` is
    /// rejected as BuildGrid does, because `A` is reserved for the default.
    public init(redis: RedisPool, storage: any Storage, prefix: String? = nil) throws {
        let p: String
        if let prefix, !prefix.isEmpty {
            guard prefix != RedisIndex.defaultPrefix else {
                throw StorageError.unsupported("redis-index prefix 'A' is reserved as the default prefix and cannot be configured")
            }
            p = prefix
        } else {
            p = RedisIndex.defaultPrefix
        }
        self.redis = redis
        self.storage = storage
        self.prefix = p
        self.totalSizeKey = p == RedisIndex.defaultPrefix ? "total_size" : p + ":total_size"
        self.keyHead = Array((p + ":").utf8)
        self.matchPattern = RedisIndex.globEscaped(p) + ":*"
        assert(RedisIndex.ttlText.description == String(RedisIndex.ttlSeconds))
    }

    // MARK: - Keys

    /// The Redis key of `digest`: `<prefix>:<hash>_<size>`.
    public func key(_ digest: Digest) -> String { prefix + ":" + digest.description }

    /// One command per digest, `verb <key> extra...`, streamed to Redis in
    /// one pipeline (see `RedisPool.pipeline(count:encode:)`). The constant
    /// parts are encoded once; each command is a few appends.
    private func runPerKey(_ digests: [Digest], _ verb: StaticString, _ extra: [StaticString] = []) throws -> [RedisReply] {
        if digests.isEmpty { return [] }
        var head = RedisCommands()
        head.begin(argumentCount: 2 + extra.count)
        head.argument(verb)
        var tailBytes: [UInt8] = []
        for e in extra {
            tailBytes.append(UInt8(ascii: "$"))
            RedisCommands.appendDecimal(Int64(e.utf8CodeUnitCount), to: &tailBytes)
            tailBytes += [13, 10]
            tailBytes.append(contentsOf: UnsafeBufferPointer(start: e.utf8Start, count: e.utf8CodeUnitCount))
            tailBytes += [13, 10]
        }
        let headBytes = head.bytes
        let keyHead = self.keyHead
        do {
            let replies = try digests.withUnsafeBufferPointer { ds in
                try redis.pipeline(count: ds.count) { batch, i in
                    batch.appendCommand { bytes in
                        RedisIndex.encodeKeyCommand(ds[i], head: headBytes, keyHead: keyHead, tail: tailBytes, into: &bytes)
                    }
                }
            }
            for r in replies { if case .error(let m) = r { throw RedisError.server(m) } }
            return replies
        } catch let e as RedisError {
            throw StorageError.unavailable("redis index (\(redis.config.endpoint)): \(e)")
        }
    }

    private static func encodeKeyCommand(_ d: Digest, head: [UInt8], keyHead: [UInt8], tail: [UInt8], into bytes: inout [UInt8]) {
        bytes.append(contentsOf: head)
        encodeKeyArgument(d, keyHead: keyHead, into: &bytes)
        bytes.append(contentsOf: tail)
    }

    /// `$<n>\r\n<prefix>:<hash>_<size>\r\n`
    private static func encodeKeyArgument(_ d: Digest, keyHead: [UInt8], into bytes: inout [UInt8]) {
        let hashLength = d.hash.utf8.count
        bytes.append(UInt8(ascii: "$"))
        RedisCommands.appendDecimal(Int64(keyHead.count + hashLength + 1 + RedisCommands.decimalLength(d.size)), to: &bytes)
        bytes.append(13); bytes.append(10)
        bytes.append(contentsOf: keyHead)
        if d.hash.utf8.withContiguousStorageIfAvailable({ bytes.append(contentsOf: $0) }) == nil {
            bytes.append(contentsOf: d.hash.utf8)
        }
        bytes.append(UInt8(ascii: "_"))
        RedisCommands.appendDecimal(d.size, to: &bytes)
        bytes.append(13); bytes.append(10)
    }

    private static let ttlText: StaticString = "31536000"

    private func keyArgument(_ d: Digest) -> RedisArgument {
        var b = [UInt8]()
        b.reserveCapacity(keyHead.count + 86)
        b.append(contentsOf: keyHead)
        b.append(contentsOf: d.hash.utf8)
        b.append(UInt8(ascii: "_"))
        b.append(contentsOf: String(d.size).utf8)
        return .bytes(b)
    }

    /// The digest named by a key under this prefix, or nil for anything else
    /// (the counter, other prefixes, malformed names).
    func digest(fromKey k: [UInt8]) -> Digest? {
        guard k.count > keyHead.count, k.starts(with: keyHead) else { return nil }
        return Digest(parsing: String(decoding: k[keyHead.count...], as: UTF8.self))
    }

    private static func globEscaped(_ s: String) -> String {
        var out = ""
        for c in s {
            if "*?[]\\^".contains(c) { out.append("\\") }
            out.append(c)
        }
        return out
    }

    // MARK: - Redis calls

    private func run(_ commands: [[RedisArgument]]) throws -> [RedisReply] {
        do {
            let replies = try redis.pipeline(commands)
            for r in replies { if case .error(let m) = r { throw RedisError.server(m) } }
            return replies
        } catch let e as RedisError {
            throw StorageError.unavailable("redis index (\(redis.config.endpoint)): \(e)")
        }
    }

    private func run(_ args: [RedisArgument]) throws -> RedisReply {
        try run([args])[0]
    }

    /// Removes index entries (DEL each, pipelined), then lowers the total by the
    /// sizes of the keys that were actually removed. Returns the removed digests.
    private func deleteFromIndex(_ digests: [Digest]) throws -> [Digest] {
        if digests.isEmpty { return [] }
        let replies = try runPerKey(digests, "DEL")
        var removed: [Digest] = []
        var bytes: Int64 = 0
        for (d, r) in zip(digests, replies) where (try? r.integerValue()) ?? 0 > 0 {
            removed.append(d)
            bytes += d.size
        }
        if bytes > 0 { _ = try run(["DECRBY", .string(totalSizeKey), .integer(bytes)]) }
        return removed
    }

    /// Drops index entries whose bytes the storage does not have. Failures are logged.
    private func dropOrphans(_ digests: [Digest]) {
        if digests.isEmpty { return }
        do {
            let removed = try deleteFromIndex(digests)
            if !removed.isEmpty { orphansRemoved.add(Int64(removed.count), ordering: .relaxed) }
            for d in removed {
                indexLog.warning("blob was indexed but not in storage; removed from the index", metadata: ["digest": "\(d)"])
            }
        } catch {
            indexLog.error("could not remove index entries of blobs missing from storage: \(error)")
        }
    }

    // MARK: - Storage

    public func start() throws { try storage.start() }
    public func stop() throws { try storage.stop() }

    /// EXISTS: the index is authoritative. Does not refresh the access time.
    public func hasBlob(_ digest: Digest) throws -> Bool {
        if digest.isEmpty { return true }
        return try run(["EXISTS", keyArgument(digest)]).integerValue() > 0
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? {
        if digest.isEmpty { return DataSource(Data()) }
        if let src = try storage.getBlob(digest) { return src }
        dropOrphans([digest])
        return nil
    }

    public func read(_ digest: Digest, offset: Int64, length: Int) throws -> Data? {
        if digest.isEmpty { return Data() }
        if let data = try storage.read(digest, offset: offset, length: length) { return data }
        dropOrphans([digest])
        return nil
    }

    /// Storage first, then SET NX EX; the total grows only when the key is new.
    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        if digest.isEmpty { return }
        try storage.commitWrite(digest, source)
        let r = try run(["SET", keyArgument(digest), "1", "EX", ttlArgument, "NX"])
        if !r.isNull {
            _ = try run(["INCRBY", .string(totalSizeKey), .integer(digest.size)])
            blobsIndexed.add(1, ordering: .relaxed)
        }
    }

    /// DEL; only if that removed a key, delete the bytes, then DEL and DECRBY
    /// again in one pipeline, so that a racing re-add can leak storage but never
    /// leave an index entry without bytes.
    public func deleteBlob(_ digest: Digest) throws {
        if digest.isEmpty { return }
        guard try run(["DEL", keyArgument(digest)]).integerValue() > 0 else { return }
        try storage.deleteBlob(digest)
        _ = try run([["DEL", keyArgument(digest)], ["DECRBY", .string(totalSizeKey), .integer(digest.size)]])
    }

    /// Removes from the index, then from storage those that were indexed.
    /// Returns the hashes whose removal failed.
    public func bulkDelete(_ digests: [Digest]) -> [String] {
        do {
            return try bulkDeleteReporting(digests).failed
        } catch {
            indexLog.error("bulk delete failed: \(error)")
            return digests.filter { !$0.isEmpty }.map(\.hash)
        }
    }

    private func bulkDeleteReporting(_ digests: [Digest]) throws -> (removed: [Digest], failed: [String]) {
        let removed = try deleteFromIndex(digests.filter { !$0.isEmpty })
        let failed = storage.bulkDelete(removed)
        return (removed, failed)
    }

    /// EXPIRE every digest asked (one pipeline); those where nothing was
    /// refreshed are missing. The empty blob is never missing.
    public func missingBlobs(_ digests: [Digest]) throws -> [Digest] {
        let asked = digests.contains(where: \.isEmpty) ? digests.filter { !$0.isEmpty } : digests
        if asked.isEmpty { return [] }
        let replies = try runPerKey(asked, "EXPIRE", [RedisIndex.ttlText])
        var missing: [Digest] = []
        for (d, r) in zip(asked, replies) {
            if case .integer(1) = r { continue }
            missing.append(d)
        }
        return missing
    }

    /// Missing blobs first; only those are stored, and those stored are indexed.
    /// Blobs already present are OK without being written.
    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        var statuses = [StorageError?](repeating: nil, count: blobs.count)
        let missing: Set<Digest>
        do {
            missing = Set(try missingBlobs(blobs.map(\.0)))
        } catch {
            return blobs.map { _ in StorageError.wrap(error) }
        }
        if missing.isEmpty { return statuses }
        let toStore = blobs.indices.filter { missing.contains(blobs[$0].0) }
        let results = storage.bulkUpdateBlobs(toStore.map { blobs[$0] })
        var stored: [Int] = []
        for (k, i) in toStore.enumerated() {
            let status = k < results.count ? results[k] : StorageError.io(errno: EIO, "storage returned no status")
            statuses[i] = status
            if status == nil { stored.append(i) }
        }
        if stored.isEmpty { return statuses }
        do {
            _ = try addToIndex(stored.map { blobs[$0].0 })
        } catch {
            for i in stored { statuses[i] = StorageError.wrap(error) }
        }
        return statuses
    }

    /// Indexes digests whose bytes the storage holds: SET NX EX for each (one
    /// streamed pipeline), then one INCRBY with the sizes of those that were
    /// new. Returns how many were new. Also rebuilds a lost index from a disk store.
    @discardableResult
    public func addToIndex(_ digests: [Digest]) throws -> Int {
        let digests = digests.filter { !$0.isEmpty }
        if digests.isEmpty { return 0 }
        let replies = try runPerKey(digests, "SET", ["1", "EX", RedisIndex.ttlText, "NX"])
        var added: Int64 = 0
        var count = 0
        for (d, r) in zip(digests, replies) where !r.isNull {
            added += d.size
            count += 1
        }
        if count > 0 {
            _ = try run(["INCRBY", .string(totalSizeKey), .integer(added)])
            blobsIndexed.add(Int64(count), ordering: .relaxed)
        }
        return count
    }

    /// Reads the storage; indexed digests it lacks are removed from the index.
    public func bulkReadBlobs(_ digests: [Digest]) throws -> [Digest: Data] {
        let asked = digests.filter { !$0.isEmpty }
        var out = asked.isEmpty ? [:] : try storage.bulkReadBlobs(asked)
        var absent: [Digest] = []
        var seen = Set<Digest>()
        for d in asked where out[d] == nil && seen.insert(d).inserted { absent.append(d) }
        dropOrphans(absent)
        if digests.contains(where: \.isEmpty) { out[Digest.empty] = Data() }
        return out
    }

    // MARK: - Cleanup

    /// Deletes blobs last accessed at or before `protectBlobsAfter` (default:
    /// now), or larger than `largeBlobThreshold` and last accessed at or before
    /// `largeBlobLifetime`, until about `n` bytes are gone. Walks the keys with
    /// SCAN, resuming where the previous call stopped. Returns the bytes deleted
    /// (with `dryRun`, the bytes that would have been deleted; nothing changes);
    /// `onDelete` is told each digest deleted (or that would be).
    public func deleteNBytes(
        _ n: Int64, dryRun: Bool = false, protectBlobsAfter: Date? = nil,
        largeBlobThreshold: Int64? = nil, largeBlobLifetime: Date? = nil,
        onDelete: ((Digest) -> Void)? = nil
    ) throws -> Int64 {
        // One reference time for the whole call, as BuildGrid does: with the
        // default protection every blob accessed before the call is eligible.
        let now = Date()
        let threshold = protectBlobsAfter ?? now
        var remaining = n
        var deletedBytes: Int64 = 0
        var seen = Set<Digest>()
        while remaining > 0 {
            let previous = deleteCursor.withLock { $0 }
            let (next, keys) = try scanPage(cursor: previous, count: RedisIndex.scanCount)
            var cursor = next
            let page = keys.compactMap { digest(fromKey: $0) }
            let ttls = try runPerKey(page, "PTTL")
            var candidates: [Digest] = []
            var protectedBytes: Int64 = 0
            for (d, r) in zip(page, ttls) {
                guard let pttl = try? r.integerValue(), pttl != -2 else { continue }  // gone meanwhile
                guard seen.insert(d).inserted else { continue }
                if remaining <= 0 {
                    cursor = previous  // the rest of this page is looked at next time
                    break
                }
                let lastAccess = RedisIndex.lastAccess(pttl: pttl, now: now)
                let large = largeBlobThreshold.map { d.size > $0 } ?? false
                if lastAccess <= threshold || (large && largeBlobLifetime.map { lastAccess <= $0 } ?? false) {
                    remaining -= d.size
                    candidates.append(d)
                } else {
                    protectedBytes += d.size
                }
            }
            deleteCursor.withLock { $0 = cursor }
            if !candidates.isEmpty {
                if dryRun {
                    deletedBytes += candidates.reduce(0) { $0 + $1.size }
                    if let onDelete { candidates.forEach(onDelete) }
                } else {
                    let (removed, failed) = try bulkDeleteReporting(candidates)
                    let failedSet = Set(failed)
                    var bytes: Int64 = 0
                    var count: Int64 = 0
                    for d in removed where !failedSet.contains(d.hash) {
                        onDelete?(d)
                        bytes += d.size
                        count += 1
                    }
                    deletedBytes += bytes
                    blobsEvicted.add(count, ordering: .relaxed)
                    bytesEvicted.add(bytes, ordering: .relaxed)
                    indexLog.debug("deleted \(count) blobs (\(bytes) bytes)")
                }
            } else if protectedBytes > 0 {
                indexLog.info("all blobs of this page were accessed after the protection time", metadata: ["bytes": "\(protectedBytes)"])
            }
            if cursor == 0 { break }
        }
        return deletedBytes
    }

    /// Last access implied by a PTTL reply: now − (lifetime − TTL left).
    /// A key without expiry (-1) counts as accessed a whole lifetime ago, as in BuildGrid.
    static func lastAccess(pttl: Int64, now: Date) -> Date {
        let left = pttl < 0 ? 0 : Double(pttl) / 1000
        return now.addingTimeInterval(-(Double(ttlSeconds) - left))
    }

    /// Up to `limit` digests, least recently accessed first (by the TTL each key
    /// has left, in milliseconds). Walks every key of the prefix.
    public func leastRecentDigests(limit: Int) throws -> [Digest] {
        guard limit > 0 else { return [] }
        var best: [(expiry: Int64, digest: Digest)] = []
        var cursor: UInt64 = 0
        var seen = Set<Digest>()
        let order: ((expiry: Int64, digest: Digest), (expiry: Int64, digest: Digest)) -> Bool = {
            $0.expiry == $1.expiry ? $0.digest < $1.digest : $0.expiry < $1.expiry
        }
        repeat {
            let (next, keys) = try scanPage(cursor: cursor, count: RedisIndex.scanCount)
            cursor = next
            let page = keys.compactMap { digest(fromKey: $0) }
            let ttls = try runPerKey(page, "PTTL")
            let nowMs = Int64(Date().timeIntervalSince1970 * 1000)
            for (d, r) in zip(page, ttls) {
                guard let pttl = try? r.integerValue(), pttl != -2, seen.insert(d).inserted else { continue }
                best.append((pttl == -1 ? Int64.min : nowMs + pttl, d))
            }
            if best.count > 2 * limit + RedisIndex.scanCount {
                best.sort(by: order)
                best.removeLast(best.count - limit)
            }
        } while cursor != 0
        best.sort(by: order)
        return best.prefix(limit).map(\.digest)
    }

    private func scanPage(cursor: UInt64, count: Int) throws -> (UInt64, [[UInt8]]) {
        let r = try run(["SCAN", .string(String(cursor)), "MATCH", .string(matchPattern), "COUNT", .integer(Int64(count))])
        guard case .array(let parts) = r, parts.count == 2,
              let c = parts[0].string.flatMap({ UInt64($0) }), case .array(let items) = parts[1]
        else { throw StorageError.unavailable("redis index: malformed SCAN reply \(r)") }
        return (c, items.compactMap(\.bytes))
    }

    // MARK: - Totals

    /// The total size counter (0 when absent).
    public func totalSize() throws -> Int64 {
        let r = try run(["GET", .string(totalSizeKey)])
        return r.isNull ? 0 : try r.integerValue()
    }

    /// Keys in the database, not counting the total size counter.
    public func blobCount() throws -> Int64 {
        let r = try run([["DBSIZE"], ["EXISTS", .string(totalSizeKey)]])
        return max(0, try r[0].integerValue() - r[1].integerValue())
    }

    public func getTotalSize() throws -> Int64 { try totalSize() }
    public func getBlobCount() throws -> Int64 { try blobCount() }

    // MARK: - BlobIndex

    /// Refreshes the access time (EXPIRE) of each digest, in one pipeline.
    public func touch(_ digests: [Digest]) throws {
        let asked = digests.filter { !$0.isEmpty }
        if asked.isEmpty { return }
        _ = try runPerKey(asked, "EXPIRE", [RedisIndex.ttlText])
    }

    /// One SCAN page of indexed digests.
    public func listPage(cursor: UInt64, count: Int) throws -> (cursor: UInt64, digests: [Digest]) {
        let (next, keys) = try scanPage(cursor: cursor, count: max(1, count))
        return (next, keys.compactMap { digest(fromKey: $0) })
    }

    public func statistics() -> [String: Int64] {
        [
            "redis_index_orphans_removed": orphansRemoved.load(ordering: .relaxed),
            "redis_index_blobs_evicted": blobsEvicted.load(ordering: .relaxed),
            "redis_index_bytes_evicted": bytesEvicted.load(ordering: .relaxed),
            "redis_index_blobs_indexed": blobsIndexed.load(ordering: .relaxed),
            "redis_connections_open": Int64(redis.openConnections),
        ]
    }
}
