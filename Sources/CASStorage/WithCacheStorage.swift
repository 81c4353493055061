import CASCore
import Foundation
import Synchronization

/// A fast cache in front of a slower fallback, with BuildGrid's
/// `!with-cache-storage` semantics:
/// - reads try the cache, then the fallback; what the fallback returns is
///   written into the cache (a cache failure is logged, not fatal). Only reads
///   fill the cache. Concurrent misses of one blob make one fallback fetch.
///   A large blob that misses is read range by range from the fallback at
///   once while it is fetched into the cache in the background;
/// - `hasBlob` answers from the cache only when fallback writes are deferred,
///   `missingBlobs` asks the fallback;
/// - writes go to the cache, then the fallback: synchronously, or (deferred)
///   through a `DeferredWriteJournal` once the cache and the journal hold the
///   blob. A cache write failure falls back to a synchronous fallback write.
///   While the fallback does not answer (`FallbackOutage`), deferred mode
///   answers `hasBlob`/`missingBlobs` from the cache and the journal, so the
///   lookup before a write (`cp` stats its target) does not wait on it;
/// - deletes go to both; only fallback failures are reported.
/// The cache only ever receives verified bytes: checking what the fallback
/// sends is the job of the `VerifyingStorage` the stack puts around it.
public final class WithCacheStorage: Storage {
    public let cache: any Storage
    public let fallback: any Storage
    /// Set when fallback writes are deferred.
    public let journal: DeferredWriteJournal?
    /// A miss on a blob larger than this is streamed from the fallback while
    /// the cache fills in the background.
    public let streamThreshold: Int64

    private let fetches = SingleFlight<Digest, BlobSource?>()
    /// Blobs the cache refused to keep (e.g. larger than it): read straight
    /// from the fallback instead of fetching them whole again.
    private let uncacheable = RecentSet<Digest>(capacity: 4096)
    /// Small blobs just fetched in bulk (verified below): the reads that
    /// follow a prefetch take them from memory, not from the cache's files.
    private let fresh = FreshBlobs(maxBytes: 64 << 20)
    /// Blobs fetched by `warm` are written into the cache behind the readers
    /// (who read them from `fresh` meanwhile): at most `maxFillsBehind`
    /// batches wait; beyond that `warm` writes its batch before it returns.
    private let fills = BackgroundJobs(threads: 1, name: "casfs-cache-fill")
    private let maxFillsBehind = 8
    private let filling = Mutex<Set<Digest>>([])
    /// Deletes seen, so that a fetch that was under way when its blob was
    /// deleted does not put it back into the cache.
    private let deletes = RecentDeletes()
    /// Deferred mode: whether the fallback is taken to be unreachable.
    public let outage = FallbackOutage()
    private let counters: Counters

    struct Counters: Sendable {
        let hits, misses, fetches, fetchBytes, streams, fillFailures, prefetched: MetricCounter
        init(_ m: MetricScope) {
            hits = m.counter(MetricCatalog.cacheHits)
            misses = m.counter(MetricCatalog.cacheMisses)
            fetches = m.counter(MetricCatalog.fallbackFetches)
            fetchBytes = m.counter(MetricCatalog.fallbackFetchBytes)
            streams = m.counter(MetricCatalog.fallbackStreams)
            fillFailures = m.counter(MetricCatalog.cacheFillFailures)
            prefetched = m.counter(MetricCatalog.prefetchedBlobs)
        }
    }

    public var deferFallbackWrites: Bool { journal != nil }

    public init(cache: any Storage, fallback: any Storage, journal: DeferredWriteJournal? = nil,
                streamThreshold: Int64 = 64 << 20, metrics: MetricScope = .standalone("storage")) {
        self.cache = cache
        self.fallback = fallback
        self.journal = journal
        self.streamThreshold = streamThreshold
        self.counters = Counters(metrics)
    }

    public func start() throws {
        try cache.start()
        try fallback.start()
        journal?.start(sendingTo: fallback, onSend: { [outage] error in outage.record(error) },
                       repairSource: { [cache] d in WithCacheStorage.provenCopy(cache, d) })
    }

    /// The cache's copy of `d` if it is proven, or verified now; else nil.
    static func provenCopy(_ cache: any Storage, _ d: Digest) -> BlobSource? {
        guard let src = try? cache.getBlob(d) else { return nil }
        if src.isVerified { return src }
        return (try? src.verify(d)) != nil ? src : nil
    }

    /// Sends what the journal holds (bounded wait), then stops both sides.
    public func stop() throws {
        fills.stop()
        journal?.stop()
        try cache.stop()
        try fallback.stop()
    }

    /// Blocks until the blobs `warm` fetched are all in the cache.
    public func waitForCacheFills() { fills.drain() }

    /// Blocks until every deferred write journaled so far reached the fallback
    /// (or `timeout` passes).
    public func waitForDeferredWrites(timeout: Double = 60) {
        guard let journal else { return }
        let end = Date().addingTimeInterval(timeout)
        while journal.pending > 0, Date() < end { usleep(10_000) }
    }

    // MARK: reads

    public func hasBlob(_ d: Digest) throws -> Bool {
        guard let journal else { return try fallback.hasBlob(d) }
        if (try? cache.hasBlob(d)) == true || journal.contains(d) { return true }
        if outage.isActive { return false }
        do {
            let found = try fallback.hasBlob(d)
            outage.record(nil)
            return found
        } catch where outage.record(error) {
            return false
        }
    }

    public func getBlob(_ d: Digest) throws -> BlobSource? {
        if let hit = cached(d, whole: true) { return hit }
        if let pending = journal?.source(d) { return pending }
        counters.misses.add()
        return try fetch(d)
    }

    public func openBlob(_ d: Digest) throws -> BlobSource? {
        if let hit = cached(d) { return hit }
        if let pending = journal?.source(d) { return pending }
        counters.misses.add()
        let tooLarge = uncacheable.contains(d)
        if d.size > streamThreshold || tooLarge {
            guard let src = try fallback.openBlob(d) else { return nil }
            counters.streams.add()
            if !tooLarge { fillInBackground(d) }
            return src
        }
        return try fetch(d)
    }

    public func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        try openBlob(d)?.read(offset: offset, length: length)
    }

    /// The cache's copy, or nil. `whole`: fetched whole (`getBlob`), so a
    /// damaged large copy is found here, before the caller reads it, and
    /// the blob is served by the fallback instead.
    private func cached(_ d: Digest, whole: Bool = false) -> BlobSource? {
        if let data = fresh.get(d) {
            counters.hits.add()
            return DataSource(data, verified: true)
        }
        do {
            if let src = try whole ? cache.getBlob(d) : cache.openBlob(d) {
                counters.hits.add()
                return src
            }
        } catch StorageError.corrupt {
            // The cache dropped its bad copy: a miss, served by the fallback.
        } catch {
            foldedLog.warning(kind: "cache read", key: d.description, "cache read of \(d) failed: \(error)")
        }
        return nil
    }

    /// Fetches the whole blob from the fallback (once for concurrent
    /// callers) and puts it in the cache.
    private func fetch(_ d: Digest) throws -> BlobSource? {
        try fetches.run(d) {
            if let hit = try? cache.openBlob(d) { return hit }
            counters.fetches.add()
            let started = deletes.now
            guard let src = try fallback.getBlob(d) else { return nil }
            counters.fetchBytes.add(src.size)
            guard !uncacheable.contains(d), !deletes.deleted(d, since: started) else { return src }
            do {
                try cache.commitWrite(d, src)
                if let cached = try cache.openBlob(d) { return cached }
            } catch {
                counters.fillFailures.add()
                if refusedForNow(d) {
                    // A memory cache short of room for now: served from the fallback this time.
                    log.debug("not caching \(d) now: \(error)")
                    return src
                }
                log.info("not caching \(d): \(error)")
            }
            uncacheable.insert(d)
            return src
        }.value
    }

    /// True if the cache could hold `d` and refused it only for lack of room now.
    private func refusedForNow(_ d: Digest) -> Bool {
        guard let bounded = cache as? CapacityBounded else { return false }
        return d.size <= bounded.capacity
    }

    private func fillInBackground(_ d: Digest) {
        guard filling.withLock({ $0.insert(d).inserted }) else { return }
        DispatchQueue.global(qos: .utility).async { [self] in
            defer { _ = filling.withLock { $0.remove(d) } }
            do { _ = try fetch(d) } catch {
                foldedLog.error(kind: "background fetch", key: d.description, "background fetch of \(d) failed: \(error)")
            }
        }
    }

    public func bulkReadBlobs(_ ds: [Digest]) throws -> [Digest: Data] {
        var found: [Digest: Data]
        do { found = try cache.bulkReadBlobs(ds) } catch {
            foldedLog.warning(kind: "cache bulk read", key: "\(type(of: error))", "cache bulk read failed: \(error)")
            found = [:]
        }
        counters.hits.add(found.count)
        var rest = ds.filter { found[$0] == nil }
        if let journal {
            for d in rest { if let src = journal.source(d), let data = try? src.readAll() { found[d] = data } }
            rest = rest.filter { found[$0] == nil }
        }
        guard !rest.isEmpty else { return found }
        counters.misses.add(rest.count)
        counters.fetches.add(rest.count)
        let started = deletes.now
        let fetched = try fallback.bulkReadBlobs(rest)
        for (d, data) in fetched {
            found[d] = data
            counters.fetchBytes.add(Int64(data.count))
        }
        fill(Array(fetched), fetchedSince: started)
        return found
    }

    /// Brings the blobs the cache lacks into it, in one bulk fallback call.
    /// Returns once they can be read without the fallback: from memory
    /// while the cache stores them behind (`waitForCacheFills`).
    public func warm(_ ds: [Digest]) {
        let missing = ds.filter { fresh.get($0) == nil && (try? cache.hasBlob($0)) != true }
        guard !missing.isEmpty else { return }
        let started = deletes.now
        do {
            let fetched = Array(try fallback.bulkReadBlobs(missing))
            counters.fetches.add(fetched.count)
            for (d, data) in fetched where !deletes.deleted(d, since: started) { fresh.insert(d, data) }
            if fills.pending < maxFillsBehind {
                fills.submit { [self] in
                    fill(fetched, fetchedSince: started)
                    counters.prefetched.add(fetched.count)
                }
            } else {
                fill(fetched, fetchedSince: started)
                counters.prefetched.add(fetched.count)
            }
        } catch {
            foldedLog.warning(kind: "prefetch", key: "\(type(of: error))", "prefetch of \(missing.count) blobs failed: \(error)")
        }
    }

    /// Stores fetched blobs in the cache, but none deleted since `started`.
    private func fill(_ fetched: [(Digest, Data)], fetchedSince started: UInt64) {
        let blobs = fetched.filter { !deletes.deleted($0.0, since: started) }
        guard !blobs.isEmpty else { return }
        let results = cache.bulkUpdateBlobs(blobs)
        let failed = results.compactMap { $0 }
        if let e = failed.first {
            counters.fillFailures.add(failed.count)
            log.info("caching \(failed.count) fetched blobs failed: \(e)")
        }
    }

    // MARK: writes

    /// Deferred: present and intact in the cache, or in the journal (the
    /// fallback is not asked, so that a stalled fallback never slows a
    /// write). Otherwise the fallback decides, and a damaged copy in the
    /// cache is not kept either.
    public func skipsWrite(_ d: Digest, _ source: BlobSource) throws -> Bool {
        if let journal {
            return (try? cache.skipsWrite(d, source)) == true || journal.contains(d)
        }
        guard try fallback.skipsWrite(d, source) else { return false }
        return (try? cache.hasBlob(d)) != true || (try? cache.skipsWrite(d, source)) == true
    }

    public func commitWrite(_ d: Digest, _ source: BlobSource) throws {
        do {
            try cache.commitWrite(d, source)
        } catch {
            if refusedForNow(d) {
                log.debug("cache has no room for \(d) now, writing through: \(error)")
            } else {
                log.warning("cache write of \(d) failed, writing through: \(error)")
            }
            try fallback.commitWrite(d, source)
            return
        }
        do {
            guard let journal else {
                try fallback.commitWrite(d, source)
                return
            }
            do {
                try journal.add(d, source)
            } catch {
                log.error("journaling the deferred write of \(d) failed, writing through: \(error)")
                try fallback.commitWrite(d, source)
            }
        } catch {
            // The write failed: the cache does not keep what the fallback refused.
            do { try cache.deleteBlob(d) } catch { log.warning("cache delete of \(d) after a failed write failed: \(error)") }
            throw error
        }
    }

    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        let cacheResults = cache.bulkUpdateBlobs(blobs)
        if let e = cacheResults.lazy.compactMap({ $0 }).first {
            log.warning("cache failed to store some blobs of a batch: \(e)")
        }
        guard let journal else {
            let statuses = fallback.bulkUpdateBlobs(blobs)
            dropFailed(blobs, statuses)
            return statuses
        }
        var statuses = [StorageError?](repeating: nil, count: blobs.count)
        var direct: [Int] = []
        for (i, (d, data)) in blobs.enumerated() {
            do { try journal.add(d, DataSource(data, verified: true)) } catch { direct.append(i) }
        }
        if !direct.isEmpty {
            let results = fallback.bulkUpdateBlobs(direct.map { blobs[$0] })
            for (k, i) in direct.enumerated() { statuses[i] = k < results.count ? results[k] : .io(errno: EIO, "no status") }
        }
        dropFailed(blobs, statuses)
        return statuses
    }

    /// The cache does not keep blobs whose write failed.
    private func dropFailed(_ blobs: [(Digest, Data)], _ statuses: [StorageError?]) {
        let failed = zip(blobs, statuses).compactMap { $1 == nil ? nil : $0.0 }
        guard !failed.isEmpty else { return }
        let left = cache.bulkDelete(failed)
        if !left.isEmpty { log.warning("cache failed to drop \(left.count) blobs whose write failed") }
    }

    public func missingBlobs(_ ds: [Digest]) throws -> [Digest] {
        guard let journal else { return try fallback.missingBlobs(ds) }
        let rest = ds.filter { !journal.contains($0) }
        if rest.isEmpty { return [] }
        let local = { rest.filter { (try? self.cache.hasBlob($0)) != true } }
        if outage.isActive { return local() }
        do {
            let missing = try fallback.missingBlobs(rest)
            outage.record(nil)
            return missing
        } catch where outage.record(error) {
            return local()
        }
    }

    public func deleteBlob(_ d: Digest) throws {
        deletes.record([d])
        journal?.cancel(d)
        fresh.remove(d)
        do { try cache.deleteBlob(d) } catch { log.warning("cache delete of \(d) failed: \(error)") }
        uncacheable.remove(d)
        try fallback.deleteBlob(d)
    }

    public func bulkDelete(_ ds: [Digest]) -> [String] {
        deletes.record(ds)
        for d in ds {
            journal?.cancel(d)
            fresh.remove(d)
        }
        let cacheFailed = cache.bulkDelete(ds)
        if !cacheFailed.isEmpty { log.warning("cache failed to delete \(cacheFailed.count) blobs") }
        return fallback.bulkDelete(ds)
    }
}

/// Which blobs were deleted after a given moment (a count of deletes), for
/// fetches that must not cache what was deleted while they ran. Bounded:
/// beyond `capacity` names it forgets them and answers "deleted" for every
/// moment before that.
final class RecentDeletes: Sendable {
    private struct State {
        var count: UInt64 = 0
        var floor: UInt64 = 0
        var at: [Digest: UInt64] = [:]
    }
    private let state = Mutex(State())
    let capacity: Int

    init(capacity: Int = 16_384) { self.capacity = capacity }

    /// The current moment.
    var now: UInt64 { state.withLock { $0.count } }

    func record(_ ds: [Digest]) {
        guard !ds.isEmpty else { return }
        state.withLock { s in
            s.count &+= 1
            if s.at.count + ds.count > capacity {
                s.at = [:]
                s.floor = s.count
            }
            for d in ds.prefix(capacity) { s.at[d] = s.count }
        }
    }

    /// Whether `d` may have been deleted after moment `since`.
    func deleted(_ d: Digest, since: UInt64) -> Bool {
        state.withLock { s in since < s.floor || (s.at[d] ?? 0) > since }
    }
}
