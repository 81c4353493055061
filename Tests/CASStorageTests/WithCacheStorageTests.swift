import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

/// The with-cache semantics. The fallback is wrapped in a VerifyingStorage,
/// as the stack builder does, so corrupt fallback bytes are caught below it.
final class WithCacheStorageTests: XCTestCase {
    struct Stack {
        let s: WithCacheStorage
        let cache: InstrumentedStorage
        let fallback: InstrumentedStorage
        let metrics: MetricScope
    }

    func make(deferWrites: Bool = false, cacheBytes: Int64 = 1 << 20, streamThreshold: Int64 = 64 << 20) throws -> Stack {
        let metrics = MetricScope.standalone("storage")
        let cache = InstrumentedStorage(MemoryStorage(maxBytes: cacheBytes))
        let fallback = InstrumentedStorage(try DiskStorage(root: tempDir()))
        let journal = deferWrites ? try DeferredWriteJournal(directory: tempDir() + "/journal", threads: 2, metrics: metrics) : nil
        let s = WithCacheStorage(cache: cache, fallback: VerifyingStorage(fallback, sourceName: "fallback", metrics: metrics),
                                 journal: journal, streamThreshold: streamThreshold, metrics: metrics)
        try s.start()
        return Stack(s: s, cache: cache, fallback: fallback, metrics: metrics)
    }

    func testMissFillsCacheAndHitSkipsFallback() throws {
        let t = try make()
        let (d, data) = blob("from the fallback")
        try t.fallback.inner.commitWrite(d, DataSource(data))
        XCTAssertEqual(try t.s.getBlob(d)?.readAll(), data)
        XCTAssertTrue(try t.cache.inner.hasBlob(d), "a read fills the cache")
        XCTAssertEqual(try t.s.read(d, offset: 5, length: 3), Data("the".utf8))
        XCTAssertEqual(t.fallback.getCalls.load(ordering: .relaxed), 1)
        XCTAssertEqual(t.metrics.value(MetricCatalog.fallbackFetches), 1)
        XCTAssertEqual(t.metrics.value(MetricCatalog.cacheHits), 1)
    }

    func testAbsentEverywhereIsNil() throws {
        let t = try make()
        let (d, _) = blob("nowhere")
        XCTAssertNil(try t.s.getBlob(d))
        XCTAssertNil(try t.s.read(d, offset: 0, length: 1))
        XCTAssertFalse(try t.s.hasBlob(d))
    }

    func testWritesGoToBoth() throws {
        let t = try make()
        let (d, data) = blob("written")
        try t.s.commitWrite(d, DataSource(data))
        XCTAssertTrue(try t.cache.inner.hasBlob(d))
        XCTAssertTrue(try t.fallback.inner.hasBlob(d))
    }

    func testCacheWriteFailureWritesThrough() throws {
        let t = try make(deferWrites: true)
        t.cache.failWrites.store(true, ordering: .relaxed)
        let (d, data) = blob("write through")
        try t.s.commitWrite(d, DataSource(data))
        XCTAssertTrue(try t.fallback.inner.hasBlob(d), "synchronous fallback write when the cache fails")
    }

    func testCacheReadFailureIsNotFatal() throws {
        let t = try make()
        let (d, data) = blob("cache broken")
        try t.fallback.inner.commitWrite(d, DataSource(data))
        t.cache.failReads.store(true, ordering: .relaxed)
        XCTAssertEqual(try t.s.getBlob(d)?.readAll(), data)
        XCTAssertEqual(try t.s.read(d, offset: 0, length: 5), Data("cache".utf8))
    }

    func testFallbackFailureIsThrown() throws {
        let t = try make()
        t.fallback.failReads.store(true, ordering: .relaxed)
        let (d, _) = blob("unreachable")
        XCTAssertThrowsError(try t.s.getBlob(d)) { XCTAssertEqual(($0 as? StorageError)?.errno, EIO) }
        XCTAssertThrowsError(try t.s.hasBlob(d))
        XCTAssertThrowsError(try t.s.missingBlobs([d]))
    }

    func testCorruptFallbackBytesAreNotServedOrCached() throws {
        let t = try make()
        let (d, data) = blob("pristine")
        try t.fallback.inner.commitWrite(d, DataSource(data))
        t.fallback.corrupt.store(true, ordering: .relaxed)
        XCTAssertThrowsError(try t.s.read(d, offset: 0, length: 8)) { e in
            guard case StorageError.corrupt = e else { return XCTFail("\(e)") }
        }
        XCTAssertFalse(try t.cache.inner.hasBlob(d))
        XCTAssertFalse(try t.fallback.inner.hasBlob(d), "the corrupt copy was removed from the fallback")
        XCTAssertEqual(t.metrics.value(MetricCatalog.verifyFailures), 1)
        // The next reader gets ENOENT, not the same bytes again.
        XCTAssertNil(try t.s.read(d, offset: 0, length: 8))
    }

    func testHasBlobUsesCacheOnlyWithDeferredWrites() throws {
        let (d, data) = blob("only in cache")
        let plain = try make()
        try plain.cache.inner.commitWrite(d, DataSource(data))
        XCTAssertFalse(try plain.s.hasBlob(d), "without deferred writes the fallback is authoritative")
        let deferred = try make(deferWrites: true)
        try deferred.cache.inner.commitWrite(d, DataSource(data))
        XCTAssertTrue(try deferred.s.hasBlob(d))
        XCTAssertEqual(try deferred.s.missingBlobs([d]), [d], "missing_blobs asks the fallback")
    }

    func testDeferredWritesAreDrainedOnStop() throws {
        let t = try make(deferWrites: true)
        let blobs = (0..<200).map { blob("deferred \($0)") }
        for (d, data) in blobs { try t.s.commitWrite(d, DataSource(data)) }
        try t.s.stop()
        XCTAssertEqual(try t.fallback.inner.missingBlobs(blobs.map(\.0)), [])
        XCTAssertEqual(t.s.journal?.pending, 0)
    }

    func testDeleteReportsOnlyFallbackFailures() throws {
        let t = try make()
        let (d, data) = blob("delete me")
        try t.s.commitWrite(d, DataSource(data))
        t.cache.failDeletes.store(true, ordering: .relaxed)
        XCTAssertNoThrow(try t.s.deleteBlob(d))
        XCTAssertFalse(try t.fallback.inner.hasBlob(d))
        t.fallback.failDeletes.store(true, ordering: .relaxed)
        XCTAssertThrowsError(try t.s.deleteBlob(d))
        XCTAssertEqual(t.s.bulkDelete([d]), [d.hash])
        t.fallback.failDeletes.store(false, ordering: .relaxed)
        XCTAssertEqual(t.s.bulkDelete([d]), [])
    }

    func testBulkReadMergesCacheAndFallback() throws {
        let t = try make()
        let a = blob("in cache"), b = blob("in fallback"), c = blob("nowhere")
        try t.cache.inner.commitWrite(a.0, DataSource(a.1))
        try t.fallback.inner.commitWrite(b.0, DataSource(b.1))
        let got = try t.s.bulkReadBlobs([a.0, b.0, c.0])
        XCTAssertEqual(got, [a.0: a.1, b.0: b.1])
        XCTAssertTrue(try t.cache.inner.hasBlob(b.0), "fetched blobs are cached")
    }

    func testBulkReadDropsCorruptFallbackBytes() throws {
        let t = try make()
        let (d, data) = blob("bulk corrupt")
        try t.fallback.inner.commitWrite(d, DataSource(data))
        t.fallback.corrupt.store(true, ordering: .relaxed)
        XCTAssertEqual(try t.s.bulkReadBlobs([d]), [:])
        XCTAssertFalse(try t.cache.inner.hasBlob(d))
        XCTAssertEqual(t.metrics.value(MetricCatalog.verifyFailures), 1)
    }

    func testBulkUpdateReturnsFallbackStatuses() throws {
        let t = try make()
        t.cache.failWrites.store(true, ordering: .relaxed)
        let blobs = [blob("x"), blob("y")]
        XCTAssertEqual(t.s.bulkUpdateBlobs(blobs).compactMap { $0 }.count, 0)
        XCTAssertEqual(try t.fallback.inner.missingBlobs(blobs.map(\.0)), [])
        t.fallback.failWrites.store(true, ordering: .relaxed)
        XCTAssertEqual(t.s.bulkUpdateBlobs([blob("z")]).compactMap { $0 }.count, 1)
    }

    func testConcurrentMissesMakeOneFallbackFetch() throws {
        let t = try make()
        let (d, data) = blob(String(repeating: "popular ", count: 1000))
        try t.fallback.inner.commitWrite(d, DataSource(data))
        t.fallback.getDelayMs.store(200, ordering: .relaxed)
        let failures = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 32) { i in
            let got = try? t.s.read(d, offset: Int64(i), length: 10)
            if got != data.subdata(in: i..<(i + 10)) { failures.add(1, ordering: .relaxed) }
        }
        XCTAssertEqual(failures.load(ordering: .relaxed), 0)
        XCTAssertEqual(t.fallback.getCalls.load(ordering: .relaxed), 1)
    }

    /// A blob larger than the cache is fetched and verified once; later opens
    /// read its ranges from the fallback instead of fetching it again.
    func testBlobLargerThanCacheIsFetchedOnce() throws {
        let t = try make()
        let data = patterned(3 << 20)
        let d = Digest.of(data)
        try t.fallback.inner.commitWrite(d, DataSource(data))
        for k in 0..<10 {
            let off = k * 300_000
            XCTAssertEqual(try t.s.read(d, offset: Int64(off), length: 4096), data.subdata(in: off..<(off + 4096)))
        }
        XCTAssertEqual(t.metrics.value(MetricCatalog.fallbackFetches), 1)
        XCTAssertEqual(t.metrics.value(MetricCatalog.fallbackStreams), 9)
        try t.s.deleteBlob(d)
        XCTAssertNil(try t.s.read(d, offset: 0, length: 10))
    }

    /// A range of a large uncached blob is answered before the whole blob has
    /// been fetched; the cache gets the blob only once it has been verified.
    func testLargeMissServesRangeWhileFillingInBackground() throws {
        let t = try make(cacheBytes: 8 << 20, streamThreshold: 1 << 20)
        let data = patterned(4 << 20)
        let d = Digest.of(data)
        try t.fallback.inner.commitWrite(d, DataSource(data))
        let gate = DispatchSemaphore(value: 0)
        t.fallback.gate.withLock { $0 = gate }
        // The whole-blob fetch is held at the gate; an in-order read still answers.
        let handle = try XCTUnwrap(t.s.openBlob(d))
        XCTAssertEqual(try handle.read(offset: 0, length: 100), data.subdata(in: 0..<100))
        XCTAssertFalse(try t.cache.inner.hasBlob(d), "nothing is cached before verification")
        t.fallback.gate.withLock { $0 = nil }
        gate.signal()
        XCTAssertTrue(waitUntil { (try? t.cache.inner.hasBlob(d)) == true }, "the background fill cached the verified blob")
        XCTAssertEqual(t.metrics.value(MetricCatalog.fallbackFetches), 1)
        let hitsBefore = t.metrics.value(MetricCatalog.cacheHits)
        XCTAssertEqual(try t.s.read(d, offset: 5, length: 5), data.subdata(in: 5..<10))
        XCTAssertEqual(t.metrics.value(MetricCatalog.cacheHits), hitsBefore + 1)
    }

    /// Corrupt bytes found by the background fill are never cached.
    func testBackgroundFillDoesNotCacheCorruptBytes() throws {
        let t = try make(cacheBytes: 8 << 20, streamThreshold: 1 << 10)
        let data = Data(repeating: 9, count: 64 << 10)
        let d = Digest.of(data)
        try t.fallback.inner.commitWrite(d, DataSource(data))
        t.fallback.corrupt.store(true, ordering: .relaxed)
        _ = try? t.s.openBlob(d)
        XCTAssertTrue(waitUntil { t.metrics.value(MetricCatalog.verifyFailures) == 1 })
        XCTAssertFalse(try t.cache.inner.hasBlob(d))
    }

    /// `warm` brings the blobs the cache lacks in one bulk call and caches
    /// only what verifies.
    func testWarmFetchesMissingBlobsInBulk() throws {
        let t = try make()
        var small: [Digest] = []
        for i in 0..<40 {
            let (d, data) = blob("small blob \(i)")
            try t.fallback.inner.commitWrite(d, DataSource(data))
            small.append(d)
        }
        _ = try t.s.getBlob(small[0])
        t.s.warm(small + [blob("absent").0])
        // Readable at once without the fallback; in the cache once the fills ran.
        let gets = t.fallback.getCalls.load(ordering: .relaxed)
        for d in small { XCTAssertNotNil(try t.s.openBlob(d)) }
        XCTAssertEqual(t.fallback.getCalls.load(ordering: .relaxed), gets)
        t.s.waitForCacheFills()
        for d in small { XCTAssertTrue(try t.cache.inner.hasBlob(d)) }
        XCTAssertEqual(t.fallback.bulkReadCalls.load(ordering: .relaxed), 1, "39 small blobs: one bulk call")
        XCTAssertEqual(t.metrics.value(MetricCatalog.prefetchedBlobs), 39)
    }

    /// A blob deleted while a bulk fetch of it was under way is not put
    /// back into the cache (nor served from memory) when the fetch returns.
    func testAFetchUnderWayDoesNotBringBackADeletedBlob() throws {
        let metrics = MetricScope.standalone("storage")
        let cache = MemoryStorage(maxBytes: 1 << 20)
        let fallback = HeldAfterRead(MemoryStorage(maxBytes: 1 << 20))
        let s = WithCacheStorage(cache: cache, fallback: fallback, journal: nil, metrics: metrics)
        try s.start()
        let (d, data) = blob("deleted during its prefetch")
        let (e, edata) = blob("kept")
        try fallback.inner.commitWrite(d, DataSource(data))
        try fallback.inner.commitWrite(e, DataSource(edata))
        let warmed = DispatchSemaphore(value: 0)
        Thread { s.warm([d, e]); warmed.signal() }.start()
        XCTAssertEqual(fallback.read.wait(timeout: .now() + 10), .success, "the bulk read happened")
        try s.deleteBlob(d)
        fallback.release.signal()
        XCTAssertEqual(warmed.wait(timeout: .now() + 10), .success)
        s.waitForCacheFills()
        XCTAssertFalse(try cache.hasBlob(d), "the deleted blob came back into the cache")
        XCTAssertNil(try s.openBlob(d))
        XCTAssertTrue(try cache.hasBlob(e))
        XCTAssertEqual(try s.openBlob(e)?.readAll(), edata)
    }
}

/// Bulk reads answer only once released, after reading the storage below.
private final class HeldAfterRead: StorageDecorator, Sendable {
    let inner: any Storage
    let read = DispatchSemaphore(value: 0)
    let release = DispatchSemaphore(value: 0)
    init(_ inner: any Storage) { self.inner = inner }
    func bulkReadBlobs(_ ds: [Digest]) throws -> [Digest: Data] {
        let found = try inner.bulkReadBlobs(ds)
        read.signal()
        release.wait()
        return found
    }
}

func patterned(_ n: Int) -> Data {
    var bytes = [UInt8](repeating: 0, count: n)
    for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 131 >> 3) }
    return Data(bytes)
}

/// Polls `condition` for up to 30 s (a bound against hangs, not a timing assertion).
func waitUntil(_ condition: () -> Bool) -> Bool {
    for _ in 0..<3000 {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}
