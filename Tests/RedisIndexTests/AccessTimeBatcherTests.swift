import CASCore
import CASStorage
import Foundation
import Synchronization
import TestSupport
import XCTest

/// A BlobIndex that records touch batches and can be told to fail.
final class RecordingIndex: BlobIndex {
    let batches = Mutex<[[Digest]]>([])
    let failing = Atomic<Bool>(false)

    func touch(_ digests: [Digest]) throws {
        if failing.load(ordering: .relaxed) { throw StorageError.unavailable("index down") }
        batches.withLock { $0.append(digests) }
    }
    func listPage(cursor: UInt64, count: Int) throws -> (cursor: UInt64, digests: [Digest]) { (0, []) }
    func totalSize() throws -> Int64 { 0 }
    func blobCount() throws -> Int64 { 0 }

    var all: [[Digest]] { batches.withLock { $0 } }
}

final class AccessTimeBatcherTests: XCTestCase {
    func testRecordsAreBatchedDeduplicatedAndThrottled() throws {
        let index = RecordingIndex()
        let batcher = AccessTimeBatcher(index: index, flushInterval: 3600, refreshAfter: 3600)
        defer { batcher.stop() }
        let a = blob("a").0, b = blob("b").0
        for _ in 0..<100 { batcher.record(a) }
        batcher.record(b)
        XCTAssertEqual(index.all, [], "record does no I/O")
        batcher.flush()
        XCTAssertEqual(index.all, [[a, b]])
        // Touched recently: not touched again.
        batcher.record(a)
        batcher.flush()
        XCTAssertEqual(index.all, [[a, b]])
        batcher.flush()
        XCTAssertEqual(index.all.count, 1, "an empty flush sends nothing")
    }

    func testRefreshWindowExpires() throws {
        let index = RecordingIndex()
        let batcher = AccessTimeBatcher(index: index, flushInterval: 3600, refreshAfter: 0)
        defer { batcher.stop() }
        let a = blob("a").0
        batcher.record(a)
        batcher.flush()
        batcher.record(a)
        batcher.flush()
        XCTAssertEqual(index.all, [[a], [a]])
    }

    func testBackgroundThreadFlushes() throws {
        let index = RecordingIndex()
        let batcher = AccessTimeBatcher(index: index, flushInterval: 0.02, refreshAfter: 60)
        defer { batcher.stop() }
        let a = blob("a").0
        batcher.record(a)
        for _ in 0..<500 where index.all.isEmpty { usleep(10_000) }
        XCTAssertEqual(index.all, [[a]])
    }

    func testErrorsAreNotThrownAndPendingDigestsAreRetried() throws {
        let index = RecordingIndex()
        index.failing.store(true, ordering: .relaxed)
        let metrics = MetricScope.standalone("index")
        let batcher = AccessTimeBatcher(index: index, flushInterval: 3600, refreshAfter: 3600, metrics: metrics)
        defer { batcher.stop() }
        let a = blob("a").0
        batcher.record(a)
        batcher.flush()
        XCTAssertEqual(index.all, [])
        XCTAssertEqual(metrics.value(MetricCatalog.accessFailures), 1)
        index.failing.store(false, ordering: .relaxed)
        batcher.flush()
        XCTAssertEqual(index.all, [[a]])
    }

    func testStopFlushesAndIsIdempotent() throws {
        let index = RecordingIndex()
        let batcher = AccessTimeBatcher(index: index, flushInterval: 3600, refreshAfter: 3600)
        let digests = (0..<10).map { blob("d\($0)").0 }
        for d in digests { batcher.record(d) }
        batcher.stop()
        XCTAssertEqual(index.all, [digests])
        batcher.stop()
        batcher.record(blob("late").0)
        batcher.flush()
        XCTAssertEqual(index.all, [digests], "nothing is recorded after stop")
    }

    func testConcurrentRecords() throws {
        let index = RecordingIndex()
        let batcher = AccessTimeBatcher(index: index, flushInterval: 0.005, refreshAfter: 3600)
        let digests = (0..<200).map { blob("c\($0)").0 }
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            for d in digests { batcher.record(d) }
        }
        batcher.stop()
        let touched = index.all.flatMap { $0 }
        XCTAssertEqual(touched.count, digests.count, "each digest is touched once")
        XCTAssertEqual(Set(touched), Set(digests))
    }

    func testRefreshesTTLsInRedis() throws {
        let server = try RedisServer.unixSocket()
        let redis = server.pool()
        let ri = try RedisIndex(redis: redis, storage: FakeStorage())
        let blobs = (0..<3).map { blob("rt\($0)") }
        for (d, data) in blobs { try ri.commitWrite(d, DataSource(data)) }
        for (d, _) in blobs { try redis.age(ri.key(d), by: 86_400) }
        let batcher = AccessTimeBatcher(index: ri, flushInterval: 3600)
        batcher.record(blobs[0].0)
        batcher.record(blobs[2].0)
        batcher.stop()
        XCTAssertGreaterThan(try redis.ttl(ri.key(blobs[0].0)), RedisIndex.ttlSeconds - 10)
        XCTAssertLessThanOrEqual(try redis.ttl(ri.key(blobs[1].0)), RedisIndex.ttlSeconds - 86_400)
        XCTAssertGreaterThan(try redis.ttl(ri.key(blobs[2].0)), RedisIndex.ttlSeconds - 10)
        XCTAssertEqual(try ri.leastRecentDigests(limit: 1), [blobs[1].0])
    }
}
