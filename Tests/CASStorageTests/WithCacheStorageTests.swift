import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

final class WithCacheStorageTests: XCTestCase {
    func make(deferWrites: Bool = false) throws -> (WithCacheStorage, InstrumentedStorage, InstrumentedStorage) {
        let cache = InstrumentedStorage(MemoryStorage(maxBytes: 1 << 20))
        let fallback = InstrumentedStorage(try DiskStorage(root: tempDir()))
        let s = WithCacheStorage(cache: cache, fallback: fallback, deferFallbackWrites: deferWrites, fallbackWriterThreads: 2)
        try s.start()
        return (s, cache, fallback)
    }

    func testMissFillsCacheAndHitSkipsFallback() throws {
        let (s, cache, fallback) = try make()
        let (d, data) = blob("from the fallback")
        try fallback.inner.commitWrite(d, DataSource(data))
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
        XCTAssertTrue(try cache.inner.hasBlob(d), "a read fills the cache")
        XCTAssertEqual(try s.read(d, offset: 5, length: 3), Data("the".utf8))
        XCTAssertEqual(fallback.getCalls.load(ordering: .relaxed), 1)
        XCTAssertEqual(s.statistics()["fallback_fetches"], 1)
        XCTAssertEqual(s.statistics()["cache_hits"], 1)
    }

    func testAbsentEverywhereIsNil() throws {
        let (s, _, _) = try make()
        let (d, _) = blob("nowhere")
        XCTAssertNil(try s.getBlob(d))
        XCTAssertNil(try s.read(d, offset: 0, length: 1))
        XCTAssertFalse(try s.hasBlob(d))
    }

    func testWritesGoToBoth() throws {
        let (s, cache, fallback) = try make()
        let (d, data) = blob("written")
        try s.commitWrite(d, DataSource(data))
        XCTAssertTrue(try cache.inner.hasBlob(d))
        XCTAssertTrue(try fallback.inner.hasBlob(d))
    }

    func testCacheWriteFailureWritesThrough() throws {
        let (s, cache, fallback) = try make(deferWrites: true)
        cache.failWrites.store(true, ordering: .relaxed)
        let (d, data) = blob("write through")
        try s.commitWrite(d, DataSource(data))
        XCTAssertTrue(try fallback.inner.hasBlob(d), "synchronous fallback write when the cache fails")
    }

    func testCacheReadFailureIsNotFatal() throws {
        let (s, cache, fallback) = try make()
        let (d, data) = blob("cache broken")
        try fallback.inner.commitWrite(d, DataSource(data))
        cache.failReads.store(true, ordering: .relaxed)
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
        XCTAssertEqual(try s.read(d, offset: 0, length: 5), Data("cache".utf8))
    }

    func testFallbackFailureIsThrown() throws {
        let (s, _, fallback) = try make()
        fallback.failReads.store(true, ordering: .relaxed)
        let (d, _) = blob("unreachable")
        XCTAssertThrowsError(try s.getBlob(d)) { XCTAssertEqual(($0 as? StorageError)?.errno, EIO) }
        XCTAssertThrowsError(try s.hasBlob(d))
        XCTAssertThrowsError(try s.missingBlobs([d]))
    }

    func testCorruptFallbackBytesAreNotServedOrCached() throws {
        let (s, cache, fallback) = try make()
        let (d, data) = blob("pristine")
        try fallback.inner.commitWrite(d, DataSource(data))
        fallback.corrupt.store(true, ordering: .relaxed)
        XCTAssertThrowsError(try s.read(d, offset: 0, length: 8)) { e in
            guard case StorageError.digestMismatch = e else { return XCTFail("\(e)") }
        }
        XCTAssertFalse(try cache.inner.hasBlob(d))
        XCTAssertEqual(try s.bulkReadBlobs([d]), [:])
        XCTAssertFalse(try cache.inner.hasBlob(d))
        XCTAssertEqual(s.statistics()["verify_failures"], 2)
    }

    func testHasBlobUsesCacheOnlyWithDeferredWrites() throws {
        let (d, data) = blob("only in cache")
        let (plain, cache1, _) = try make()
        try cache1.inner.commitWrite(d, DataSource(data))
        XCTAssertFalse(try plain.hasBlob(d), "without deferred writes the fallback is authoritative")
        let (deferred, cache2, _) = try make(deferWrites: true)
        try cache2.inner.commitWrite(d, DataSource(data))
        XCTAssertTrue(try deferred.hasBlob(d))
        XCTAssertEqual(try deferred.missingBlobs([d]), [d], "missing_blobs always asks the fallback")
    }

    func testDeferredWritesAreDrainedOnStop() throws {
        let (s, _, fallback) = try make(deferWrites: true)
        let blobs = (0..<200).map { blob("deferred \($0)") }
        for (d, data) in blobs { try s.commitWrite(d, DataSource(data)) }
        try s.stop()
        XCTAssertEqual(try fallback.inner.missingBlobs(blobs.map(\.0)), [])
        XCTAssertEqual(s.statistics()["deferred_writes_pending"], 0)
    }

    func testDeleteReportsOnlyFallbackFailures() throws {
        let (s, cache, fallback) = try make()
        let (d, data) = blob("delete me")
        try s.commitWrite(d, DataSource(data))
        cache.failDeletes.store(true, ordering: .relaxed)
        XCTAssertNoThrow(try s.deleteBlob(d))
        XCTAssertFalse(try fallback.inner.hasBlob(d))
        fallback.failDeletes.store(true, ordering: .relaxed)
        XCTAssertThrowsError(try s.deleteBlob(d))
        XCTAssertEqual(s.bulkDelete([d]), [d.hash])
        fallback.failDeletes.store(false, ordering: .relaxed)
        XCTAssertEqual(s.bulkDelete([d]), [])
    }

    func testBulkReadMergesCacheAndFallback() throws {
        let (s, cache, fallback) = try make()
        let a = blob("in cache"), b = blob("in fallback"), c = blob("nowhere")
        try cache.inner.commitWrite(a.0, DataSource(a.1))
        try fallback.inner.commitWrite(b.0, DataSource(b.1))
        let got = try s.bulkReadBlobs([a.0, b.0, c.0])
        XCTAssertEqual(got, [a.0: a.1, b.0: b.1])
        XCTAssertTrue(try cache.inner.hasBlob(b.0), "fetched blobs are cached")
    }

    func testBulkUpdateReturnsFallbackStatuses() throws {
        let (s, cache, fallback) = try make()
        cache.failWrites.store(true, ordering: .relaxed)
        let blobs = [blob("x"), blob("y")]
        XCTAssertEqual(s.bulkUpdateBlobs(blobs).compactMap { $0 }.count, 0)
        XCTAssertEqual(try fallback.inner.missingBlobs(blobs.map(\.0)), [])
        fallback.failWrites.store(true, ordering: .relaxed)
        XCTAssertEqual(s.bulkUpdateBlobs([blob("z")]).compactMap { $0 }.count, 1)
    }

    func testConcurrentMissesMakeOneFallbackFetch() throws {
        let (s, _, fallback) = try make()
        let (d, data) = blob(String(repeating: "popular ", count: 1000))
        try fallback.inner.commitWrite(d, DataSource(data))
        fallback.getDelayMs.store(200, ordering: .relaxed)
        let failures = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 32) { i in
            let got = try? s.read(d, offset: Int64(i), length: 10)
            if got != data.subdata(in: i..<(i + 10)) { failures.add(1, ordering: .relaxed) }
        }
        XCTAssertEqual(failures.load(ordering: .relaxed), 0)
        XCTAssertEqual(fallback.getCalls.load(ordering: .relaxed), 1)
    }
}

final class WithCacheLargeBlobTests: XCTestCase {
    /// A blob larger than the cache is fetched and verified once; later range
    /// reads go to the fallback directly instead of re-verifying the whole blob.
    func testBlobLargerThanCacheIsVerifiedOnce() throws {
        let fallback = InstrumentedStorage(try DiskStorage(root: tempDir()))
        let s = WithCacheStorage(cache: MemoryStorage(maxBytes: 1 << 20), fallback: fallback)
        var bytes = [UInt8](repeating: 0, count: 3 << 20)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i * 31) }
        let data = Data(bytes)
        let d = Digest.of(data)
        try fallback.inner.commitWrite(d, DataSource(data))
        for k in 0..<10 {
            let off = k * 300_000
            XCTAssertEqual(try s.read(d, offset: Int64(off), length: 4096), data.subdata(in: off..<(off + 4096)))
        }
        XCTAssertEqual(s.statistics()["fallback_fetches"], 1)
        XCTAssertEqual(s.statistics()["fallback_range_reads"], 9)
        // A deleted blob is noticed: the read answers absent.
        try s.deleteBlob(d)
        XCTAssertNil(try s.read(d, offset: 0, length: 10))
    }
}

final class WithCacheStreamingTests: XCTestCase {
    /// A range of a large uncached blob is answered before the whole blob has
    /// been fetched; the cache gets the blob only once it has been verified.
    func testLargeMissServesRangeWhileFillingInBackground() throws {
        let cache = InstrumentedStorage(MemoryStorage(maxBytes: 8 << 20))
        let fallback = InstrumentedStorage(try DiskStorage(root: tempDir()))
        let s = WithCacheStorage(cache: cache, fallback: fallback, streamThreshold: 1 << 20)
        var bytes = [UInt8](repeating: 0, count: 4 << 20)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 131 >> 3) }
        let data = Data(bytes)
        let d = Digest.of(data)
        try fallback.inner.commitWrite(d, DataSource(data))

        let gate = DispatchSemaphore(value: 0)
        fallback.gate.withLock { $0 = gate }
        // The whole-blob fetch is held at the gate; ranged reads still answer.
        XCTAssertEqual(try s.read(d, offset: 1000, length: 100), data.subdata(in: 1000..<1100))
        XCTAssertEqual(try s.read(d, offset: 3 << 20, length: 10), data.subdata(in: (3 << 20)..<((3 << 20) + 10)))
        XCTAssertFalse(try cache.inner.hasBlob(d), "nothing is cached before verification")
        fallback.gate.withLock { $0 = nil }
        gate.signal()
        XCTAssertTrue(waitUntil { (try? cache.inner.hasBlob(d)) == true }, "the background fill cached the verified blob")
        XCTAssertEqual(s.statistics()["fallback_fetches"], 1)
        let hitsBefore = s.statistics()["cache_hits"] ?? 0
        XCTAssertEqual(try s.read(d, offset: 5, length: 5), data.subdata(in: 5..<10))
        XCTAssertEqual(s.statistics()["cache_hits"], hitsBefore + 1)
    }

    /// Corrupt bytes found by the background fill are never cached.
    func testBackgroundFillDoesNotCacheCorruptBytes() throws {
        let cache = InstrumentedStorage(MemoryStorage(maxBytes: 8 << 20))
        let fallback = InstrumentedStorage(try DiskStorage(root: tempDir()))
        let s = WithCacheStorage(cache: cache, fallback: fallback, streamThreshold: 1 << 10)
        let data = Data(repeating: 9, count: 64 << 10)
        let d = Digest.of(data)
        try fallback.inner.commitWrite(d, DataSource(data))
        fallback.corrupt.store(true, ordering: .relaxed)
        _ = try s.read(d, offset: 0, length: 10)
        XCTAssertTrue(waitUntil { s.statistics()["verify_failures"] == 1 })
        XCTAssertFalse(try cache.inner.hasBlob(d))
    }
}

extension WithCacheStorageTests {
    /// Prefetch fetches the small blobs the cache lacks in bulk calls, in the
    /// background, and caches only what verifies.
    func testPrefetchFetchesSmallMissingBlobsInBulk() throws {
        let (s, cache, fallback) = try make()
        var small: [Digest] = []
        for i in 0..<40 {
            let (d, data) = blob("small blob \(i)")
            try fallback.inner.commitWrite(d, DataSource(data))
            small.append(d)
        }
        let bigData = Data(repeating: 1, count: (1 << 20) + 1)
        let big = Digest.of(bigData)
        try fallback.inner.commitWrite(big, DataSource(bigData))
        // One is cached already, one is absent everywhere.
        _ = try s.getBlob(small[0])
        let absent = blob("absent").0
        s.prefetch(small + [big, absent])
        XCTAssertTrue(waitUntil { s.statistics()["prefetched_blobs"] == 39 })
        for d in small { XCTAssertTrue(try cache.inner.hasBlob(d)) }
        XCTAssertFalse(try cache.inner.hasBlob(big), "blobs over the prefetch limit are left to readers")
        XCTAssertEqual(fallback.bulkReadCalls.load(ordering: .relaxed), 1, "39 small blobs: one bulk call")
        let gets = fallback.getCalls.load(ordering: .relaxed)
        for d in small { _ = try s.getBlob(d) }
        XCTAssertEqual(fallback.getCalls.load(ordering: .relaxed), gets, "prefetched blobs are cache hits")
    }

    /// A reader that misses on a blob a running prefetch batch is fetching
    /// waits for that batch instead of fetching the blob again.
    func testReaderWaitsForRunningPrefetchInsteadOfFetchingTwice() throws {
        let (s, _, fallback) = try make()
        let (d, data) = blob("being prefetched")
        try fallback.inner.commitWrite(d, DataSource(data))
        let gate = DispatchSemaphore(value: 0)
        fallback.gate.withLock { $0 = gate }
        s.prefetch([d])
        XCTAssertTrue(waitUntil { fallback.bulkReadCalls.load(ordering: .relaxed) == 1 })
        let got = Mutex<Data?>(nil)
        let done = DispatchSemaphore(value: 0)
        Thread {
            let data = try? s.getBlob(d)?.readAll()
            got.withLock { $0 = data }
            done.signal()
        }.start()
        usleep(100_000)
        XCTAssertEqual(got.withLock { $0 }, nil, "the reader waits while the batch runs")
        fallback.gate.withLock { $0 = nil }
        // Enough for both, should the reader have gone to the fallback itself.
        gate.signal()
        gate.signal()
        XCTAssertEqual(done.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(got.withLock { $0 }, data)
        XCTAssertEqual(fallback.getCalls.load(ordering: .relaxed), 0, "no second fetch of the blob")
    }

    func testPrefetchNeverCachesCorruptBytesOrThrows() throws {
        let (s, cache, fallback) = try make()
        let (d, data) = blob("will be corrupted")
        try fallback.inner.commitWrite(d, DataSource(data))
        fallback.corrupt.store(true, ordering: .relaxed)
        s.prefetch([d])
        XCTAssertTrue(waitUntil { s.statistics()["verify_failures"] == 1 })
        XCTAssertFalse(try cache.inner.hasBlob(d))
        fallback.corrupt.store(false, ordering: .relaxed)
        fallback.failReads.store(true, ordering: .relaxed)
        s.prefetch([blob("other").0])
        try s.stop()  // waits for the running prefetch; a failed one is only logged
        XCTAssertEqual(s.statistics()["prefetched_blobs"], 0)
    }
}

/// Polls `condition` for up to 30 s (a bound against hangs, not a timing assertion).
func waitUntil(_ condition: () -> Bool) -> Bool {
    for _ in 0..<3000 {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}
