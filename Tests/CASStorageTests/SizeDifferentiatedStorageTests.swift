import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

/// Counts starts and stops.
final class LifecycleStorage: StorageDecorator {
    let inner: any Storage = MemoryStorage(maxBytes: 1 << 20)
    let starts = Atomic<Int>(0)
    let stops = Atomic<Int>(0)
    func start() throws { starts.add(1, ordering: .relaxed) }
    func stop() throws { stops.add(1, ordering: .relaxed) }
}

final class SizeDifferentiatedStorageTests: XCTestCase {
    func memory() -> InstrumentedStorage { InstrumentedStorage(MemoryStorage(maxBytes: 1 << 20)) }

    func blobOf(size: Int) -> (Digest, Data) {
        let data = Data((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ size) })
        return (Digest.of(data), data)
    }

    /// Limits are taken in ascending order; a blob goes to the first limit
    /// strictly above its size, else to the fallback.
    func testRoutingBySize() throws {
        let small = memory(), medium = memory(), fallback = memory()
        let s = SizeDifferentiatedStorage(tiers: [.init(maxSize: 100, storage: medium), .init(maxSize: 10, storage: small)],
                                          fallback: fallback, threadPoolSize: 0)
        XCTAssertEqual(s.tiers.map(\.maxSize), [10, 100])
        try s.start()
        let expected: [(Int, InstrumentedStorage)] = [(0, small), (9, small), (10, medium), (99, medium), (100, fallback), (5000, fallback)]
        for (size, store) in expected {
            let b = blobOf(size: size)
            try s.commitWrite(b.0, DataSource(b.1, verified: true))
            for other in [small, medium, fallback] {
                XCTAssertEqual(try other.inner.hasBlob(b.0), other === store, "size \(size)")
            }
            XCTAssertEqual(try s.getBlob(b.0)?.readAll(), b.1)
        }
    }

    func testEqualLimitsKeepTheirOrder() throws {
        let first = memory(), second = memory()
        let s = SizeDifferentiatedStorage(tiers: [.init(maxSize: 50, storage: first), .init(maxSize: 50, storage: second)],
                                          fallback: memory(), threadPoolSize: 0)
        let b = blobOf(size: 20)
        try s.commitWrite(b.0, DataSource(b.1, verified: true))
        XCTAssertTrue(try first.inner.hasBlob(b.0))
        XCTAssertFalse(try second.inner.hasBlob(b.0))
    }

    /// Every child is started and stopped, the fallback included (BuildGrid
    /// leaves the fallback out); a child listed twice only once.
    func testStartAndStopReachEveryChildOnce() throws {
        let tier = LifecycleStorage(), fallback = LifecycleStorage()
        let s = SizeDifferentiatedStorage(tiers: [.init(maxSize: 10, storage: tier), .init(maxSize: 20, storage: tier)],
                                          fallback: fallback, threadPoolSize: 0)
        try s.start()
        try s.stop()
        for c in [tier, fallback] {
            XCTAssertEqual(c.starts.load(ordering: .relaxed), 1)
            XCTAssertEqual(c.stops.load(ordering: .relaxed), 1)
        }
    }

    func testBulkOperationsWithAFailingFallback() throws {
        let small = memory(), fallback = memory()
        let s = SizeDifferentiatedStorage(tiers: [.init(maxSize: 64, storage: small)], fallback: fallback, threadPoolSize: 2)
        let blobs = [blobOf(size: 10), blobOf(size: 100), blobOf(size: 20), blobOf(size: 200), blobOf(size: 63)]
        fallback.failWrites.store(true, ordering: .relaxed)
        XCTAssertEqual(s.bulkUpdateBlobs(blobs).map { $0?.errno }, [nil, ENOSPC, nil, ENOSPC, nil])
        fallback.failWrites.store(false, ordering: .relaxed)
        XCTAssertTrue(s.bulkUpdateBlobs(blobs).allSatisfy { $0 == nil })
        let absent = blobOf(size: 1000).0
        XCTAssertEqual(try s.missingBlobs([absent] + blobs.map(\.0)), [absent])
        XCTAssertEqual(try s.bulkReadBlobs(blobs.map(\.0)).count, 5)
        fallback.failReads.store(true, ordering: .relaxed)
        XCTAssertEqual(try s.getBlob(blobs[0].0)?.readAll(), blobs[0].1, "the small store still answers")
        XCTAssertThrowsError(try s.getBlob(blobs[1].0))
        XCTAssertThrowsError(try s.bulkReadBlobs(blobs.map(\.0)))
        fallback.failReads.store(false, ordering: .relaxed)
        fallback.failDeletes.store(true, ordering: .relaxed)
        XCTAssertEqual(Set(s.bulkDelete(blobs.map(\.0))), [blobs[1].0.hash, blobs[3].0.hash])
    }

    func testThreadPoolRunsCallsTogether() throws {
        let barrier = Barrier(2), inFlight = InFlight()
        let small = MeetingStorage(barrier: barrier, inFlight: inFlight)
        let fallback = MeetingStorage(barrier: barrier, inFlight: inFlight)
        let s = SizeDifferentiatedStorage(tiers: [.init(maxSize: 50, storage: small)], fallback: fallback, threadPoolSize: 4)
        let blobs = [blobOf(size: 5), blobOf(size: 500), blobOf(size: 6), blobOf(size: 600)]
        XCTAssertTrue(s.bulkUpdateBlobs(blobs).allSatisfy { $0 == nil })
        XCTAssertEqual(try s.bulkReadBlobs(blobs.map(\.0)).count, 4)
        XCTAssertFalse(small.missedMeeting.load(ordering: .relaxed) || fallback.missedMeeting.load(ordering: .relaxed))
        XCTAssertEqual(inFlight.most, 2)
    }
}
