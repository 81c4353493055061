import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

final class EmptyBlobAndWriteCheckingTests: XCTestCase {
    func testEmptyBlobExistsEverywhereAndNeverReachesTheStore() throws {
        let inner = InstrumentedStorage(MemoryStorage(maxBytes: 100))
        let s = EmptyBlobStorage(inner)
        XCTAssertTrue(try s.hasBlob(.empty))
        XCTAssertEqual(try s.getBlob(.empty)?.size, 0)
        XCTAssertEqual(try s.missingBlobs([.empty]), [])
        XCTAssertEqual(try s.bulkReadBlobs([.empty]), [.empty: Data()])
        XCTAssertNoThrow(try s.commitWrite(.empty, DataSource(Data())))
        XCTAssertThrowsError(try s.commitWrite(.empty, DataSource(Data("x".utf8))))
        XCTAssertEqual(s.bulkUpdateBlobs([(.empty, Data())]).compactMap { $0 }.count, 0)
        XCTAssertEqual(inner.writeCalls.load(ordering: .relaxed), 0)
        XCTAssertEqual(inner.getCalls.load(ordering: .relaxed), 0)
    }

    func testWritesAreCheckedAndPresentBlobsSkipped() throws {
        let inner = InstrumentedStorage(MemoryStorage(maxBytes: 1000))
        let m = MetricScope.standalone("storage")
        let s = WriteCheckingStorage(EmptyBlobStorage(inner), metrics: m)
        let (d, data) = blob("checked")
        XCTAssertThrowsError(try s.commitWrite(d, DataSource(Data("checkeD".utf8)))) { e in
            guard case StorageError.digestMismatch = e else { return XCTFail("\(e)") }
        }
        XCTAssertThrowsError(try s.commitWrite(d, DataSource(Data("check".utf8)))) { e in
            guard case StorageError.sizeMismatch = e else { return XCTFail("\(e)") }
        }
        XCTAssertFalse(try inner.hasBlob(d), "nothing stored for a rejected write")
        try s.commitWrite(d, DataSource(data))
        try s.commitWrite(d, DataSource(data))
        XCTAssertEqual(inner.writeCalls.load(ordering: .relaxed), 1, "the second write of the same blob is a no-op")
        XCTAssertEqual(m.value(MetricCatalog.writesRejected), 2)
        XCTAssertEqual(m.value(MetricCatalog.writesSkipped), 1)
        // Bulk: one bad blob does not stop the others.
        let good = blob("good"), bad = (blob("bad").0, Data("bax".utf8))
        let statuses = s.bulkUpdateBlobs([good, bad])
        XCTAssertNil(statuses[0])
        XCTAssertNotNil(statuses[1])
        XCTAssertTrue(try inner.hasBlob(good.0))
        XCTAssertFalse(try inner.hasBlob(bad.0))
        // The empty blob: checked, never stored.
        XCTAssertThrowsError(try s.commitWrite(.empty, DataSource(Data("x".utf8))))
        XCTAssertNoThrow(try s.commitWrite(.empty, DataSource(Data())))
    }
}

final class PrefetchingStorageTests: XCTestCase {
    func make() throws -> (PrefetchingStorage, WithCacheStorage, InstrumentedStorage, InstrumentedStorage, MetricScope) {
        let m = MetricScope.standalone("storage")
        let cache = InstrumentedStorage(MemoryStorage(maxBytes: 8 << 20))
        let fallback = InstrumentedStorage(try DiskStorage(root: tempDir()))
        let wc = WithCacheStorage(cache: cache, fallback: VerifyingStorage(fallback, sourceName: "fallback", metrics: m), metrics: m)
        return (PrefetchingStorage(wc), wc, cache, fallback, m)
    }

    func testHintsFetchSmallMissingBlobsInBulk() throws {
        let (s, _, cache, fallback, m) = try make()
        var small: [Digest] = []
        for i in 0..<40 {
            let (d, data) = blob("small blob \(i)")
            try fallback.inner.commitWrite(d, DataSource(data))
            small.append(d)
        }
        let bigData = Data(repeating: 1, count: (1 << 20) + 1)
        let big = Digest.of(bigData)
        try fallback.inner.commitWrite(big, DataSource(bigData))
        _ = try s.getBlob(small[0])
        s.prefetch(small + [big, blob("absent").0])
        XCTAssertTrue(waitUntil { m.value(MetricCatalog.prefetchedBlobs) == 39 })
        for d in small { XCTAssertTrue(try cache.inner.hasBlob(d)) }
        XCTAssertFalse(try cache.inner.hasBlob(big), "blobs over the prefetch limit are left to readers")
        XCTAssertEqual(fallback.bulkReadCalls.load(ordering: .relaxed), 1)
        let gets = fallback.getCalls.load(ordering: .relaxed)
        for d in small { _ = try s.getBlob(d) }
        XCTAssertEqual(fallback.getCalls.load(ordering: .relaxed), gets, "prefetched blobs are cache hits")
    }

    func testReaderWaitsForRunningBatchInsteadOfFetchingTwice() throws {
        let (s, _, _, fallback, _) = try make()
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
        gate.signal()
        gate.signal()
        XCTAssertEqual(done.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(got.withLock { $0 }, data)
        XCTAssertEqual(fallback.getCalls.load(ordering: .relaxed), 0, "no second fetch of the blob")
    }

    /// A reader of a blob whose batch waits behind others runs that batch
    /// itself, with the blob's neighbours, instead of waiting or fetching alone.
    func testReaderRunsItsQueuedBatchItself() throws {
        let m = MetricScope.standalone("storage")
        let cache = InstrumentedStorage(MemoryStorage(maxBytes: 8 << 20))
        let fallback = InstrumentedStorage(try DiskStorage(root: tempDir()))
        let wc = WithCacheStorage(cache: cache, fallback: VerifyingStorage(fallback, sourceName: "fallback", metrics: m), metrics: m)
        let s = PrefetchingStorage(wc, batchBytes: 64, threads: 1)
        var digests: [Digest] = []
        for i in 0..<4 {
            let (d, data) = blob("queued blob \(i) with some length to it")
            try fallback.inner.commitWrite(d, DataSource(data))
            digests.append(d)
        }
        let gate = DispatchSemaphore(value: 0)
        fallback.gate.withLock { $0 = gate }
        s.prefetch(digests)  // one blob per batch; the only thread blocks on the first
        XCTAssertTrue(waitUntil { fallback.bulkReadCalls.load(ordering: .relaxed) == 1 })
        let done = DispatchSemaphore(value: 0)
        let last = digests[3]
        Thread {
            _ = try? s.getBlob(last)
            done.signal()
        }.start()
        XCTAssertTrue(waitUntil { fallback.bulkReadCalls.load(ordering: .relaxed) == 2 }, "the reader ran the last batch")
        fallback.gate.withLock { $0 = nil }
        gate.signal()
        gate.signal()
        XCTAssertEqual(done.wait(timeout: .now() + 30), .success)
        for d in digests { _ = try s.getBlob(d) }
        XCTAssertEqual(fallback.getCalls.load(ordering: .relaxed), 0, "no blob fetched alone")
        try s.stop()
    }

    func testPrefetchNeverCachesCorruptBytesOrThrows() throws {
        let (s, _, cache, fallback, m) = try make()
        let (d, data) = blob("will be corrupted")
        try fallback.inner.commitWrite(d, DataSource(data))
        fallback.corrupt.store(true, ordering: .relaxed)
        s.prefetch([d])
        XCTAssertTrue(waitUntil { m.value(MetricCatalog.verifyFailures) == 1 })
        XCTAssertFalse(try cache.inner.hasBlob(d))
        fallback.corrupt.store(false, ordering: .relaxed)
        fallback.failReads.store(true, ordering: .relaxed)
        s.prefetch([blob("other").0])
        try s.stop()
        XCTAssertEqual(m.value(MetricCatalog.prefetchedBlobs), 0)
    }
}

final class DeferredWriteJournalTests: XCTestCase {
    /// A fallback that fails until told otherwise, counting attempts.
    final class Flaky: Storage, Sendable {
        let inner: MemoryStorage
        let failing = Atomic<Bool>(true)
        let attempts = Atomic<Int>(0)
        init(_ inner: MemoryStorage) { self.inner = inner }
        func hasBlob(_ d: Digest) throws -> Bool { try inner.hasBlob(d) }
        func getBlob(_ d: Digest) throws -> BlobSource? { try inner.getBlob(d) }
        func deleteBlob(_ d: Digest) throws { try inner.deleteBlob(d) }
        func commitWrite(_ d: Digest, _ s: BlobSource) throws {
            attempts.add(1, ordering: .relaxed)
            if failing.load(ordering: .relaxed) { throw StorageError.unavailable("down") }
            try inner.commitWrite(d, s)
        }
    }

    func testFailedSendsAreRetriedNotDropped() throws {
        let dir = tempDir() + "/journal"
        let fallback = Flaky(MemoryStorage(maxBytes: 1 << 20))
        let j = try DeferredWriteJournal(directory: dir, threads: 2, maxBackoff: 0.2)
        j.start(sendingTo: fallback)
        let blobs = (0..<5).map { blob("journaled \($0)") }
        for (d, data) in blobs { try j.add(d, DataSource(data)) }
        XCTAssertTrue(waitUntil { fallback.attempts.load(ordering: .relaxed) >= 15 }, "each blob is tried again")
        XCTAssertEqual(j.pending, 5)
        XCTAssertEqual(try j.source(blobs[0].0)?.readAll(), blobs[0].1, "pending blobs are readable from the journal")
        fallback.failing.store(false, ordering: .relaxed)
        XCTAssertTrue(waitUntil { j.pending == 0 })
        for (d, _) in blobs { XCTAssertTrue(try fallback.hasBlob(d)) }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [])
        j.stop()
    }

    func testJournalSurvivesARestart() throws {
        let dir = tempDir() + "/journal"
        let down = Flaky(MemoryStorage(maxBytes: 1 << 20))
        let first = try DeferredWriteJournal(directory: dir, threads: 1, maxBackoff: 60)
        first.start(sendingTo: down)
        let blobs = (0..<3).map { blob("survives \($0)") }
        for (d, data) in blobs { try first.add(d, DataSource(data)) }
        first.stop(timeout: 0.5)
        XCTAssertEqual(first.pending, 3)
        // A new process: what the directory holds is sent.
        let up = Flaky(MemoryStorage(maxBytes: 1 << 20))
        up.failing.store(false, ordering: .relaxed)
        let second = try DeferredWriteJournal(directory: dir, threads: 1)
        second.start(sendingTo: up)
        XCTAssertTrue(waitUntil { second.pending == 0 })
        for (d, data) in blobs { XCTAssertEqual(try up.getBlob(d)?.readAll(), data) }
        second.stop()
    }
}
