import CASCore
import Foundation
import Logging
import Redis
import Synchronization

let indexLog = Logger(label: "casfs.redis-index")

/// An index of blobs in Redis in front of a storage, key-compatible with
/// BuildGrid's RedisIndex so both can share one Redis and one disk store.
///
/// Schema (BuildGrid's): one key `<prefix>:<hash>_<size>` per blob, value `1`,
/// TTL 365 days; the time since the last access is `365 d - TTL left`. The total
/// size is kept in `total_size` (default prefix) or `<prefix>:total_size`.
/// Nothing else is stored: the least-recently-used order is read from the
/// keys' remaining TTLs in milliseconds (PTTL), so blobs written by a BuildGrid
/// server are ordered and aged like casfs's own.
///
/// Index and store agree: bytes are stored before their key is set, keys are
/// removed before their bytes, and a delete that meets a concurrent re-add of
/// the same blob keeps (or restores) the bytes, so no key ever names bytes
/// that are gone and no acknowledged write is lost.
public final class RedisIndex: Storage, BlobIndex {
    /// BuildGrid's default key prefix. It cannot be configured explicitly.
    public static let defaultPrefix = "A"
    /// Lifetime of an index entry after its last access: 365 days.
    public static let ttlSeconds: Int64 = 31_536_000
    /// SCAN page size used by cleanup and listing.
    public static let scanCount = 1000

    public let redis: RedisPool
    public let storage: any Storage
    public let prefix: String
    /// The key of the total size counter.
    public let totalSizeKey: String
    /// The Redis holds this index and nothing else (casfs's private Redis):
    /// the blob count is then DBSIZE, not a walk of the keys.
    public let exclusive: Bool

    let keyHead: [UInt8]
    let matchPattern: String
    let ttlArgument = RedisArgument.string(String(RedisIndex.ttlSeconds))
    let deleteCursor = Mutex<UInt64>(0)
    let countCache = Mutex<(value: Int64?, at: Date, refreshing: Bool)>((nil, .distantPast, false))
    /// Copies whose index write failed while Redis did not answer.
    let unsettled = UnsettledCopies()
    let counters: Counters

    struct Counters: Sendable {
        let orphans, evictedBlobs, evictedBytes, added, races, redisErrors: MetricCounter
    }

    /// `prefix` nil (or empty) means BuildGrid's default `A`; an explicit `A` is
    /// rejected as BuildGrid does, because `A` is reserved for the default.
    public init(redis: RedisPool, storage: any Storage, prefix: String? = nil, exclusive: Bool = false,
                metrics: MetricScope = .standalone("index")) throws {
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
        self.exclusive = exclusive
        self.totalSizeKey = p == RedisIndex.defaultPrefix ? "total_size" : p + ":total_size"
        self.keyHead = Array((p + ":").utf8)
        self.matchPattern = RedisIndex.globEscaped(p) + ":*"
        counters = Counters(orphans: metrics.counter(MetricCatalog.indexOrphans),
                            evictedBlobs: metrics.counter(MetricCatalog.indexEvictedBlobs),
                            evictedBytes: metrics.counter(MetricCatalog.indexEvictedBytes),
                            added: metrics.counter(MetricCatalog.indexAdded),
                            races: metrics.counter(MetricCatalog.indexRaces),
                            redisErrors: metrics.counter(MetricCatalog.redisErrors))
        RedisPoolMetrics.register(redis, metrics, errors: counters.redisErrors)
    }

    // MARK: - Keys

    /// The Redis key of `digest`: `<prefix>:<hash>_<size>`.
    public func key(_ digest: Digest) -> String { prefix + ":" + digest.description }

    /// One command per digest, `verb <key> extra...`, streamed to Redis in
    /// one pipeline (see `RedisPool.pipeline(count:encode:)`). The constant
    /// parts are encoded once; each command is a few appends.
    /// `durable`: the pipeline waits for the replicas the connection asks
    /// for (Sentinel), so an acknowledged write survives a failover.
    /// `uncertain`: a failure that leaves unknown whether the commands ran
    /// (a lost connection, a timeout) is thrown as `IndexOutcomeUnknown`.
    func runPerKey(_ digests: [Digest], _ verb: StaticString, _ extra: [StaticString] = [], durable: Bool = false,
                   uncertain: Bool = false) throws -> [RedisReply] {
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
                try redis.pipeline(count: ds.count, durable: durable) { batch, i in
                    batch.appendCommand { bytes in
                        bytes.append(contentsOf: headBytes)
                        RedisIndex.encodeKeyArgument(ds[i], keyHead: keyHead, into: &bytes)
                        bytes.append(contentsOf: tailBytes)
                    }
                }
            }
            try checkReplies(replies)
            return replies
        } catch let e as RedisError {
            if case .notDurable = e { throw IndexNotDurable(error: unavailable(e)) }
            if uncertain, e.outcomeUnknown { throw IndexOutcomeUnknown(error: unavailable(e)) }
            throw unavailable(e)
        }
    }

    /// An index write failed in a way that leaves unknown whether Redis ran
    /// it, or will run it still (a connection lost or timed out mid-call).
    struct IndexOutcomeUnknown: Error {
        let error: StorageError
    }

    /// A durable index write reached the master but too few replicas: the
    /// key is set, so the bytes it names must stay; the write still fails.
    struct IndexNotDurable: Error {
        let error: StorageError
    }

    /// The pool counts its own failures (`RedisPoolMetrics`); error replies
    /// reach only the index, which counts them here.
    private func checkReplies(_ replies: [RedisReply]) throws {
        for r in replies {
            if case .error(let m) = r {
                counters.redisErrors.add()
                throw unavailable(.server(m))
            }
        }
    }

    private func unavailable(_ e: RedisError) -> StorageError {
        .unavailable("redis index (\(redis.config.endpoint)): \(e)")
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

    static let ttlText: StaticString = "31536000"

    func keyArgument(_ d: Digest) -> RedisArgument {
        var b = [UInt8]()
        b.reserveCapacity(keyHead.count + 86)
        b.append(contentsOf: keyHead)
        b.append(contentsOf: d.hash.utf8)
        b.append(UInt8(ascii: "_"))
        b.append(contentsOf: String(d.size).utf8)
        return .bytes(b)
    }

    /// The digest named by a key under this prefix, or nil for anything else
    /// (the counter, other prefixes, malformed names, sizes out of range).
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

    func run(_ commands: [[RedisArgument]]) throws -> [RedisReply] {
        do {
            let replies = try redis.pipeline(commands)
            try checkReplies(replies)
            return replies
        } catch let e as RedisError {
            throw unavailable(e)
        }
    }

    func run(_ args: [RedisArgument]) throws -> RedisReply {
        try run([args])[0]
    }

    /// Removes index entries (DEL each, pipelined), then lowers the total by the
    /// sizes of the keys that were actually removed. Returns the removed digests.
    func deleteFromIndex(_ digests: [Digest]) throws -> [Digest] {
        if digests.isEmpty { return [] }
        let replies = try runPerKey(digests, "DEL")
        var removed: [Digest] = []
        for (d, r) in zip(digests, replies) where (try? r.integerValue()) ?? 0 > 0 { removed.append(d) }
        try lowerTotal(by: removed)
        adjustCount(-removed.count)
        return removed
    }

    /// DECRBY the summed sizes (in steps that each fit in a Redis integer).
    func lowerTotal(by digests: [Digest]) throws {
        for part in RedisIndex.sizeSums(digests) where part > 0 { try adjustTotal("DECRBY", part) }
    }

    func raiseTotal(by digests: [Digest]) throws {
        for part in RedisIndex.sizeSums(digests) where part > 0 { try adjustTotal("INCRBY", part) }
    }

    /// One INCRBY or DECRBY of the counter. An error reply (the counter is
    /// not an integer, or would leave the 64-bit range: another writer shares
    /// this Redis) is logged, not thrown: a blob is indexed by its own key,
    /// and `reconcile` recomputes the total. Connection failures are thrown.
    private func adjustTotal(_ command: String, _ part: Int64) throws {
        let reply: RedisReply
        do {
            reply = try redis.pipeline([[.string(command), .string(totalSizeKey), .integer(part)]])[0]
        } catch let e as RedisError {
            throw unavailable(e)
        }
        if case .error(let m) = reply {
            counters.redisErrors.add()
            indexLog.warning("\(command) \(totalSizeKey) \(part) refused (\(m)): the total stays as it is until `casfs reindex` recomputes it")
        }
    }

    /// The sizes of `digests` summed into as few Int64 parts as fit (sizes
    /// come from names and may be anything up to Int64.max).
    static func sizeSums(_ digests: [Digest]) -> [Int64] {
        var parts: [Int64] = []
        var sum: Int64 = 0
        for d in digests {
            if let s = sum.checkedAdd(d.size) {
                sum = s
            } else {
                parts.append(sum)
                sum = d.size
            }
        }
        parts.append(sum)
        return parts
    }

    /// Drops index entries whose bytes the storage does not have. Failures are logged.
    func dropOrphans(_ digests: [Digest]) {
        if digests.isEmpty { return }
        do {
            let removed = try deleteFromIndex(digests)
            counters.orphans.add(removed.count)
            for d in removed {
                indexLog.warning("blob was indexed but not in storage; removed from the index", metadata: ["digest": "\(d)"])
            }
        } catch {
            indexLog.error("could not remove index entries of blobs missing from storage: \(error)")
        }
    }

    /// Deletes the bytes of blobs whose keys this call removed. With a store
    /// that can withdraw blobs, a blob indexed again meanwhile (a racing
    /// write was acknowledged) is restored; otherwise its key is removed again,
    /// so no key names bytes that are gone. Returns the hashes that failed.
    func removeBytes(_ digests: [Digest]) -> [String] {
        if digests.isEmpty { return [] }
        guard let reversible = storage as? ReversibleDeletion else {
            let failed = storage.bulkDelete(digests)
            let failedSet = Set(failed)
            do {
                let readded = try deleteFromIndex(digests.filter { !failedSet.contains($0.hash) })
                if !readded.isEmpty {
                    counters.races.add(readded.count)
                    indexLog.warning("\(readded.count) blobs were indexed again while being deleted; their keys were removed again")
                }
            } catch {
                indexLog.error("could not re-check index entries after a delete: \(error)")
            }
            return failed
        }
        var withdrawn: [WithdrawnBlob] = []
        var failed: [String] = []
        for d in digests {
            do {
                if let w = try reversible.withdraw(d) { withdrawn.append(w) }
            } catch {
                indexLog.error("deleting \(d) failed: \(error)")
                failed.append(d.hash)
            }
        }
        let indexed: [Bool]
        do {
            indexed = try runPerKey(withdrawn.map(\.digest), "EXISTS").map { ((try? $0.integerValue()) ?? 0) > 0 }
        } catch {
            // Cannot tell whether a writer re-added them: keep the bytes.
            indexLog.error("could not check for concurrent writes after a delete; restoring \(withdrawn.count) blobs: \(error)")
            indexed = Array(repeating: true, count: withdrawn.count)
        }
        for (w, back) in zip(withdrawn, indexed) {
            if back {
                counters.races.add()
                if !reversible.restore(w) {
                    indexLog.error("could not restore \(w.digest) after a racing write")
                    failed.append(w.digest.hash)
                }
            } else {
                reversible.discard(w)
            }
        }
        return failed
    }

    // MARK: - Storage

    public func start() throws { try storage.start() }
    public func stop() throws { try storage.stop() }

    /// EXISTS: the index is authoritative. Does not refresh the access time.
    public func hasBlob(_ digest: Digest) throws -> Bool {
        try run(["EXISTS", keyArgument(digest)]).integerValue() > 0
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? {
        if let src = try storage.getBlob(digest) { return src }
        dropOrphans([digest])
        return nil
    }

    public func openBlob(_ digest: Digest) throws -> BlobSource? {
        if let src = try storage.openBlob(digest) { return src }
        dropOrphans([digest])
        return nil
    }

    public func read(_ digest: Digest, offset: Int64, length: Int) throws -> Data? {
        try openBlob(digest)?.read(offset: offset, length: length)
    }

    /// Storage first, then SET NX EX (the total grows only when the key is
    /// new); then, if a racing delete took the bytes meanwhile, store them
    /// again. An index write that fails leaves no bytes behind that this
    /// write stored (see `settleFailedIndexWrite`).
    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        try storeAndIndex(digest, source)
        if try !storage.hasBlob(digest) {
            try storeAndIndex(digest, source)
        }
    }

    private func storeAndIndex(_ digest: Digest, _ source: BlobSource) throws {
        var created: FileStamp?
        if let tracking = storage as? CopyTracking {
            created = try tracking.commitTracked(digest, source)
        } else {
            try storage.commitWrite(digest, source)
        }
        do {
            try indexNew([digest])
        } catch let e as IndexNotDurable {
            throw e.error
        } catch let e as IndexOutcomeUnknown {
            settleLater([(digest, created)], e.error)
            throw e.error
        } catch {
            if settleFailedIndexWrite([(digest, created)], error)[0] { return }
            throw error
        }
    }

    /// Present in the index (refreshed) and in the storage (which decides
    /// whether its copy can be trusted).
    public func skipsWrite(_ digest: Digest, _ source: BlobSource) throws -> Bool {
        guard try missingBlobs([digest]).isEmpty else { return false }
        return try storage.skipsWrite(digest, source)
    }

    public func recordVerified(_ digest: Digest, _ source: BlobSource) {
        storage.recordVerified(digest, source)
    }

    /// DEL; only if that removed a key, delete the bytes (see `removeBytes`).
    public func deleteBlob(_ digest: Digest) throws {
        guard try run(["DEL", keyArgument(digest)]).integerValue() > 0 else { return }
        adjustCount(-1)
        try lowerTotal(by: [digest])
        if let failed = removeBytes([digest]).first {
            throw StorageError.io(errno: EIO, "could not delete the bytes of \(failed)")
        }
    }

    /// Removes from the index, then from storage those that were indexed.
    /// Returns the hashes whose removal failed.
    public func bulkDelete(_ digests: [Digest]) -> [String] {
        do {
            return removeBytes(try deleteFromIndex(digests))
        } catch {
            indexLog.error("bulk delete failed: \(error)")
            return digests.map(\.hash)
        }
    }

    /// Removes a damaged copy of `digest` from the index and the store:
    /// the key first (DEL, and DECRBY if it was there), then the copy, but
    /// only the one `withdraw` still finds (it returns nil when another
    /// writer replaced the copy meanwhile). A copy present afterwards (that
    /// writer's) is indexed again, so no key is lost for bytes that are
    /// there and no key is left for bytes that are gone. True if the damaged
    /// copy was removed.
    public func removeDamaged(_ digest: Digest, withdraw: () throws -> WithdrawnBlob?,
                              discard: (WithdrawnBlob) -> Void) throws -> Bool {
        let hadKey = try !deleteFromIndex([digest]).isEmpty
        let withdrawn: WithdrawnBlob?
        do { withdrawn = try withdraw() } catch {
            if hadKey { _ = try? addToIndex([digest]) }
            throw error
        }
        if let withdrawn { discard(withdrawn) }
        if hadKey, try storage.hasBlob(digest) {
            try addToIndex([digest])
        } else if hadKey {
            indexLog.notice("removed the damaged copy of \(digest) and its index entry")
        }
        return withdrawn != nil
    }

    /// EXPIRE every digest asked (one pipeline); those where nothing was
    /// refreshed are missing.
    public func missingBlobs(_ digests: [Digest]) throws -> [Digest] {
        if digests.isEmpty { return [] }
        let replies = try runPerKey(digests, "EXPIRE", [RedisIndex.ttlText])
        var missing: [Digest] = []
        for (d, r) in zip(digests, replies) {
            if case .integer(1) = r { continue }
            missing.append(d)
        }
        return missing
    }

    /// Missing blobs first (and indexed ones whose bytes are gone); only those
    /// are stored, and those stored are indexed. Blobs already present are
    /// OK without being written.
    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        var statuses = [StorageError?](repeating: nil, count: blobs.count)
        var missing: Set<Digest>
        do {
            let digests = blobs.map(\.0)
            missing = Set(try missingBlobs(digests))
            let indexed = digests.filter { !missing.contains($0) }
            if !indexed.isEmpty { missing.formUnion(try storage.missingBlobs(indexed)) }
        } catch {
            return blobs.map { _ in StorageError.wrap(error) }
        }
        if missing.isEmpty { return statuses }
        let toStore = blobs.indices.filter { missing.contains(blobs[$0].0) }
        var stored: [Int] = []
        var created: [Int: FileStamp] = [:]
        if let tracking = storage as? CopyTracking {
            for i in toStore {
                do {
                    created[i] = try tracking.commitTracked(blobs[i].0, DataSource(blobs[i].1, verified: true))
                    stored.append(i)
                } catch {
                    statuses[i] = StorageError.wrap(error)
                }
            }
        } else {
            let results = storage.bulkUpdateBlobs(toStore.map { blobs[$0] })
            for (k, i) in toStore.enumerated() {
                let status = k < results.count ? results[k] : StorageError.io(errno: EIO, "storage returned no status")
                statuses[i] = status
                if status == nil { stored.append(i) }
            }
        }
        if stored.isEmpty { return statuses }
        do {
            try indexNew(stored.map { blobs[$0].0 })
        } catch let e as IndexNotDurable {
            for i in stored { statuses[i] = e.error }
            return statuses
        } catch let e as IndexOutcomeUnknown {
            settleLater(stored.map { (blobs[$0].0, created[$0]) }, e.error)
            for i in stored { statuses[i] = e.error }
            return statuses
        } catch {
            let indexed = settleFailedIndexWrite(stored.map { (blobs[$0].0, created[$0]) }, error)
            for (k, i) in stored.enumerated() where !indexed[k] { statuses[i] = StorageError.wrap(error) }
            return statuses
        }
        do {
            // A racing delete may have taken bytes after they were stored.
            let gone = Set(try storage.missingBlobs(stored.map { blobs[$0].0 }))
            if !gone.isEmpty {
                let again = stored.filter { gone.contains(blobs[$0].0) }
                for (k, status) in storage.bulkUpdateBlobs(again.map { blobs[$0] }).enumerated() where k < again.count {
                    statuses[again[k]] = status
                }
                try addToIndex(again.map { blobs[$0].0 })
            }
        } catch {
            for i in stored { statuses[i] = StorageError.wrap(error) }
        }
        return statuses
    }

    /// Indexes digests whose bytes the storage holds: SET NX EX for each (one
    /// streamed pipeline), then INCRBY with the sizes of those that were new.
    /// Returns how many were new.
    @discardableResult
    public func addToIndex(_ digests: [Digest]) throws -> Int {
        do { return try indexNew(digests) } catch let e as IndexNotDurable { throw e.error } catch let e as IndexOutcomeUnknown {
            throw e.error
        }
    }

    /// `addToIndex`, throwing `IndexNotDurable` when the keys reached the
    /// master but too few replicas.
    @discardableResult
    func indexNew(_ digests: [Digest]) throws -> Int {
        if digests.isEmpty { return 0 }
        let replies = try runPerKey(digests, "SET", ["1", "EX", RedisIndex.ttlText, "NX"], durable: true, uncertain: true)
        var added: [Digest] = []
        for (d, r) in zip(digests, replies) where !r.isNull { added.append(d) }
        if !added.isEmpty {
            try raiseTotal(by: added)
            counters.added.add(added.count)
            adjustCount(added.count)
        }
        return added.count
    }

    /// Reads the storage; indexed digests it lacks are removed from the index.
    public func bulkReadBlobs(_ digests: [Digest]) throws -> [Digest: Data] {
        if digests.isEmpty { return [:] }
        let out = try storage.bulkReadBlobs(digests)
        var absent: [Digest] = []
        var seen = Set<Digest>()
        for d in digests where out[d] == nil && seen.insert(d).inserted { absent.append(d) }
        dropOrphans(absent)
        return out
    }

    // MARK: - Totals

    /// The total size counter (0 when absent). A value that is not a 64-bit
    /// integer (another writer shares this Redis) counts as 0, with a
    /// warning: `reconcile` (`casfs reindex`) recomputes it.
    public func totalSize() throws -> Int64 {
        let r = try run(["GET", .string(totalSizeKey)])
        if r.isNull { return 0 }
        guard let n = try? r.integerValue() else {
            indexLog.warning("\(totalSizeKey) holds \(r), not a byte count: taken as 0 until `casfs reindex` recomputes it")
            return 0
        }
        return n
    }

    /// Blobs under this prefix: DBSIZE on a Redis that holds only this index,
    /// else a walk of the prefix's keys (other prefixes, BuildGrid's other
    /// keys and the counter are not counted).
    public func blobCount() throws -> Int64 {
        if exclusive {
            let r = try run([["DBSIZE"], ["EXISTS", .string(totalSizeKey)]])
            return max(0, try r[0].integerValue().saturatingSubtract(r[1].integerValue()))
        }
        var cursor: UInt64 = 0
        var n: Int64 = 0
        repeat {
            let (next, keys) = try scanPage(cursor: cursor, count: 10_000)
            for k in keys where digest(fromKey: k) != nil { n += 1 }
            cursor = next
        } while cursor != 0
        return n
    }

    /// The blob count without a walk of the keys each time: the last walk's
    /// count (refreshed in the background when older than `maxAge`, so other
    /// writers' changes show within that), kept current with this process's
    /// own adds and deletes. The first call walks the keys.
    public func recentBlobCount(maxAge: Double = 30) -> Int64? {
        if exclusive { return try? blobCount() }
        let (value, stale) = countCache.withLock { c -> (Int64?, Bool) in
            let stale = Date().timeIntervalSince(c.at) > maxAge && !c.refreshing
            if stale { c.refreshing = true }
            return (c.value, stale)
        }
        if value == nil {
            let n = try? blobCount()
            countCache.withLock { c in
                if let n { c.value = n }
                c.at = Date()
                c.refreshing = false
            }
            return n
        }
        if stale {
            DispatchQueue.global(qos: .utility).async { [self] in
                let n = try? blobCount()
                countCache.withLock { c in
                    if let n { c.value = n }
                    c.at = Date()
                    c.refreshing = false
                }
            }
        }
        return value
    }

    func adjustCount(_ delta: Int) {
        guard delta != 0 else { return }
        countCache.withLock { c in c.value = c.value.map { max(0, $0.saturatingAdd(Int64(delta))) } }
    }

    public func getTotalSize() throws -> Int64 { try totalSize() }
    public func getBlobCount() throws -> Int64 { try blobCount() }

    // MARK: - BlobIndex

    /// Refreshes the access time (EXPIRE) of each digest, in one pipeline.
    public func touch(_ digests: [Digest]) throws {
        _ = try runPerKey(digests, "EXPIRE", [RedisIndex.ttlText])
    }

    /// One SCAN page of indexed digests.
    public func listPage(cursor: UInt64, count: Int) throws -> (cursor: UInt64, digests: [Digest]) {
        let (next, keys) = try scanPage(cursor: cursor, count: max(1, count))
        return (next, keys.compactMap { digest(fromKey: $0) })
    }

    func scanPage(cursor: UInt64, count: Int) throws -> (UInt64, [[UInt8]]) {
        let r = try run(["SCAN", .string(String(cursor)), "MATCH", .string(matchPattern), "COUNT", .integer(Int64(count))])
        guard case .array(let parts) = r, parts.count == 2,
              let c = parts[0].string.flatMap({ UInt64($0) }), case .array(let items) = parts[1]
        else { throw StorageError.unavailable("redis index: malformed SCAN reply \(r)") }
        return (c, items.compactMap(\.bytes))
    }
}
