import CASCore
import Foundation
import Synchronization

/// A fast cache in front of a slower fallback, with BuildGrid's
/// `!with-cache-storage` semantics:
/// - reads try the cache, then the fallback; what the fallback returns is
///   verified against the digest and then written into the cache (a cache
///   failure is logged, not fatal). Only reads fill the cache;
/// - `hasBlob` answers from the cache only when fallback writes are deferred,
///   `missingBlobs` always asks the fallback;
/// - writes go to the cache, then the fallback (queued to a writer pool when
///   deferred; synchronously if the cache write failed);
/// - deletes go to both; only fallback failures are reported.
/// Concurrent misses of one digest make one fallback fetch.
public final class WithCacheStorage: Storage, StatisticsReporting {
    public let cache: any Storage
    public let fallback: any Storage
    public let deferFallbackWrites: Bool
    /// Verify bytes that come from the fallback before caching or serving them.
    public let verifyFallbackReads: Bool

    private let writers: WriterPool?
    private let fetches = SingleFlight<Digest, BlobSource?>()
    private let counters = Counters()
    /// Blobs the fallback served and that verified, but the cache could not
    /// keep (e.g. larger than it): their ranges are read from the fallback
    /// directly instead of fetching and verifying the whole blob again.
    private let verifiedUncached = RecentSet<Digest>(capacity: 4096)

    /// A range read that misses on a blob larger than this is answered from
    /// the fallback at once while the whole blob is fetched, verified and
    /// cached in the background (the cache only ever keeps verified bytes).
    public let streamThreshold: Int64
    /// Digests being fetched in the background.
    private let filling = Mutex<Set<Digest>>([])

    /// Prefetch hints: blobs up to `prefetchBlobLimit` are fetched in bulk
    /// calls of up to `prefetchBatchBytes` by `prefetchThreads` threads, in
    /// the order hinted; hints are dropped while `prefetchMaxQueued` wait.
    public let prefetchBlobLimit: Int64 = 1 << 20
    public let prefetchBatchBytes: Int64 = 4 << 20
    public let prefetchThreads = 4
    public let prefetchMaxQueued = 1024
    private let prefetchPool = Mutex<WriterPool?>(nil)
    private let stopping = Atomic<Bool>(false)
    /// Digests a running prefetch batch is fetching: a reader that misses on
    /// one waits for the batch (bounded) instead of fetching it a second time.
    private let inflight = NSCondition()
    nonisolated(unsafe) private var inflightDigests: Set<Digest> = []  // guarded by `inflight`
    private let inflightWait: TimeInterval = 5

    public init(cache: any Storage, fallback: any Storage, deferFallbackWrites: Bool = false,
                fallbackWriterThreads: Int = 8, verifyFallbackReads: Bool = true,
                streamThreshold: Int64 = 64 << 20) {
        self.cache = cache
        self.fallback = fallback
        self.deferFallbackWrites = deferFallbackWrites
        self.verifyFallbackReads = verifyFallbackReads
        self.streamThreshold = streamThreshold
        self.writers = deferFallbackWrites ? WriterPool(threads: fallbackWriterThreads, name: "casfs-fallback-writer") : nil
    }

    public func start() throws {
        try cache.start()
        try fallback.start()
    }

    /// Waits for queued fallback writes, then stops both sides.
    public func stop() throws {
        // Queued prefetches give up; wait for the ones running.
        stopping.store(true, ordering: .relaxed)
        prefetchPool.withLock { $0 }?.stop()
        writers?.stop()
        try cache.stop()
        try fallback.stop()
    }

    public func hasBlob(_ digest: Digest) throws -> Bool {
        if deferFallbackWrites, (try? cache.hasBlob(digest)) == true { return true }
        return try fallback.hasBlob(digest)
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? {
        if let hit = cachedBlob(digest) { return hit }
        return try fetch(digest)
    }

    public func read(_ digest: Digest, offset: Int64, length: Int) throws -> Data? {
        do {
            if let data = try cache.read(digest, offset: offset, length: length) {
                counters.hits.add(1, ordering: .relaxed)
                return data
            }
        } catch {
            log.warning("cache read of \(digest) failed: \(error)")
        }
        if verifiedUncached.contains(digest) {
            counters.fallbackReads.add(1, ordering: .relaxed)
            if let data = try fallback.read(digest, offset: offset, length: length) { return data }
            verifiedUncached.remove(digest)
            return nil
        }
        if digest.size > streamThreshold {
            // A large blob: serve this range now, fill the cache behind it.
            counters.fallbackReads.add(1, ordering: .relaxed)
            guard let data = try fallback.read(digest, offset: offset, length: length) else { return nil }
            fillInBackground(digest)
            return data
        }
        guard let src = try fetch(digest) else { return nil }
        return try src.read(offset: offset, length: length)
    }

    private func fillInBackground(_ digest: Digest) {
        guard filling.withLock({ $0.insert(digest).inserted }) else { return }
        DispatchQueue.global(qos: .utility).async { [self] in
            defer { _ = filling.withLock { $0.remove(digest) } }
            do { _ = try fetch(digest) } catch {
                log.error("background fetch of \(digest) failed: \(error)")
            }
        }
    }

    /// Fetches the small blobs among `digests` that the cache lacks in bulk
    /// calls (one round trip per batch to a remote fallback), verifies and
    /// caches them. Readers never wait for it: a read that comes first fetches
    /// its blob itself.
    public func prefetch(_ digests: [Digest]) {
        guard !stopping.load(ordering: .relaxed) else { return }
        var wanted = digests.filter { $0.size > 0 && $0.size <= prefetchBlobLimit }
        guard !wanted.isEmpty else { return }
        let pool = prefetchPool.withLock { p -> WriterPool in
            if let p { return p }
            let made = WriterPool(threads: prefetchThreads, name: "casfs-prefetch")
            p = made
            return made
        }
        guard pool.pending < prefetchMaxQueued else { return }
        var seen = Set<Digest>()
        wanted = wanted.filter { seen.insert($0).inserted }
        // One job per batch, so that several threads work on one large hint.
        var batch: [Digest] = []
        var bytes: Int64 = 0
        for d in wanted {
            if bytes + d.size > prefetchBatchBytes, !batch.isEmpty {
                let b = batch
                pool.submit { [self] in prefetchBatch(b) }
                batch = []
                bytes = 0
            }
            batch.append(d)
            bytes += d.size
        }
        if !batch.isEmpty {
            let last = batch
            pool.submit { [self] in prefetchBatch(last) }
        }
    }

    private func prefetchBatch(_ all: [Digest]) {
        guard !stopping.load(ordering: .relaxed) else { return }
        // What readers fetched meanwhile, or another batch is fetching, is left out.
        inflight.lock()
        let digests = all.filter { !inflightDigests.contains($0) && (try? cache.hasBlob($0)) != true }
        inflightDigests.formUnion(digests)
        inflight.unlock()
        guard !digests.isEmpty else { return }
        defer {
            inflight.lock()
            inflightDigests.subtract(digests)
            inflight.broadcast()
            inflight.unlock()
        }
        let found: [Digest: Data]
        do { found = try fallback.bulkReadBlobs(digests) } catch {
            log.warning("prefetch of \(digests.count) blobs failed: \(error)")
            return
        }
        var verified: [(Digest, Data)] = []
        for (d, data) in found {
            if verifyFallbackReads, Digest.of(data) != d {
                counters.verifyFailures.add(1, ordering: .relaxed)
                log.error("fallback returned corrupt bytes for \(d); not cached")
                continue
            }
            verified.append((d, data))
        }
        counters.prefetched.add(verified.count, ordering: .relaxed)
        if !verified.isEmpty, let e = cache.bulkUpdateBlobs(verified).lazy.compactMap({ $0 }).first {
            log.info("prefetch: caching failed: \(e)")
        }
    }

    public func deleteBlob(_ digest: Digest) throws {
        do { try cache.deleteBlob(digest) } catch { log.warning("cache delete of \(digest) failed: \(error)") }
        verifiedUncached.remove(digest)
        try fallback.deleteBlob(digest)
    }

    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        do {
            try cache.commitWrite(digest, source)
        } catch {
            log.warning("cache write of \(digest) failed, writing through: \(error)")
            try fallback.commitWrite(digest, source)
            return
        }
        guard let writers else {
            try fallback.commitWrite(digest, source)
            return
        }
        let fallback = self.fallback
        writers.submit {
            do { try fallback.commitWrite(digest, source) } catch {
                log.error("deferred fallback write of \(digest) failed: \(error)")
            }
        }
    }

    public func bulkDelete(_ digests: [Digest]) -> [String] {
        let cacheFailed = cache.bulkDelete(digests)
        if !cacheFailed.isEmpty { log.warning("cache failed to delete \(cacheFailed.count) blobs") }
        return fallback.bulkDelete(digests)
    }

    public func missingBlobs(_ digests: [Digest]) throws -> [Digest] {
        try fallback.missingBlobs(digests)
    }

    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        let cacheResults = cache.bulkUpdateBlobs(blobs)
        if let e = cacheResults.lazy.compactMap({ $0 }).first {
            log.warning("cache failed to store some blobs of a batch: \(e)")
        }
        return fallback.bulkUpdateBlobs(blobs)
    }

    public func bulkReadBlobs(_ digests: [Digest]) throws -> [Digest: Data] {
        var found: [Digest: Data]
        do { found = try cache.bulkReadBlobs(digests) } catch {
            log.warning("cache bulk read failed: \(error)")
            found = [:]
        }
        counters.hits.add(found.count, ordering: .relaxed)
        let rest = digests.filter { found[$0] == nil }
        guard !rest.isEmpty else { return found }
        counters.misses.add(rest.count, ordering: .relaxed)
        counters.fallbackFetches.add(rest.count, ordering: .relaxed)
        var fetched: [(Digest, Data)] = []
        for (d, data) in try fallback.bulkReadBlobs(rest) {
            if verifyFallbackReads, Digest.of(data) != d {
                counters.verifyFailures.add(1, ordering: .relaxed)
                log.error("fallback returned corrupt bytes for \(d); not cached")
                continue
            }
            found[d] = data
            fetched.append((d, data))
        }
        if !fetched.isEmpty {
            let results = cache.bulkUpdateBlobs(fetched)
            if let e = results.lazy.compactMap({ $0 }).first { log.warning("caching fetched blobs failed: \(e)") }
        }
        return found
    }

    public func statistics() -> [String: Int64] {
        var s = counters.snapshot()
        s["deferred_writes_pending"] = Int64(writers?.pending ?? 0)
        for part in [cache, fallback] {
            if let r = part as? StatisticsReporting { s.merge(r.statistics()) { a, _ in a } }
        }
        return s
    }

    /// Blocks until every deferred fallback write queued so far has run.
    public func waitForDeferredWrites() { writers?.drain() }

    // MARK: - Miss path

    private func cachedBlob(_ digest: Digest) -> BlobSource? {
        do {
            if let src = try cache.getBlob(digest) {
                counters.hits.add(1, ordering: .relaxed)
                return src
            }
        } catch {
            log.warning("cache read of \(digest) failed: \(error)")
        }
        return nil
    }

    /// If a running prefetch batch holds the digest, waits (bounded) for it:
    /// the blob is then in the cache and is not fetched twice.
    private func waitForPrefetch(_ digest: Digest) {
        inflight.lock()
        defer { inflight.unlock() }
        let deadline = Date().addingTimeInterval(inflightWait)
        while inflightDigests.contains(digest), Date() < deadline {
            _ = inflight.wait(until: deadline)
        }
    }

    /// Fetches from the fallback (once for concurrent callers), verifies, and fills the cache.
    private func fetch(_ digest: Digest) throws -> BlobSource? {
        counters.misses.add(1, ordering: .relaxed)
        waitForPrefetch(digest)
        return try fetches.run(digest) {
            // A concurrent fetch may have filled the cache since our miss.
            if let hit = try? cache.getBlob(digest) { return hit }
            counters.fallbackFetches.add(1, ordering: .relaxed)
            guard let src = try fallback.getBlob(digest) else { return nil }
            if verifyFallbackReads {
                do { try src.verify(digest) } catch {
                    counters.verifyFailures.add(1, ordering: .relaxed)
                    log.error("fallback returned corrupt bytes for \(digest); not cached: \(error)")
                    throw error
                }
            }
            do {
                try cache.commitWrite(digest, src)
                if let cached = try cache.getBlob(digest) { return cached }
            } catch {
                log.info("not caching \(digest): \(error)")
            }
            verifiedUncached.insert(digest)
            return src
        }.value
    }
}

private final class Counters: Sendable {
    let hits = Atomic<Int>(0)
    let misses = Atomic<Int>(0)
    let fallbackFetches = Atomic<Int>(0)
    let verifyFailures = Atomic<Int>(0)
    let fallbackReads = Atomic<Int>(0)
    let prefetched = Atomic<Int>(0)

    func snapshot() -> [String: Int64] {
        [
            "cache_hits": Int64(hits.load(ordering: .relaxed)),
            "cache_misses": Int64(misses.load(ordering: .relaxed)),
            "fallback_fetches": Int64(fallbackFetches.load(ordering: .relaxed)),
            "verify_failures": Int64(verifyFailures.load(ordering: .relaxed)),
            "fallback_range_reads": Int64(fallbackReads.load(ordering: .relaxed)),
            "prefetched_blobs": Int64(prefetched.load(ordering: .relaxed)),
        ]
    }
}
