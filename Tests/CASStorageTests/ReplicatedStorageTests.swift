import CASCore
import CASStorage
import Foundation
import Synchronization
import TestSupport
import XCTest

/// Replicas are disk stores, each behind a VerifyingStorage as the stack
/// builder puts them.
final class ReplicatedStorageTests: XCTestCase {
    struct Setup {
        let s: ReplicatedStorage
        let replicas: [InstrumentedStorage]
        let disks: [DiskStorage]
        let metrics: MetricScope
        func has(_ i: Int, _ d: Digest) -> Bool { (try? disks[i].hasBlob(d)) == true }
        func put(_ i: Int, _ b: (Digest, Data)) throws { try disks[i].commitWrite(b.0, DataSource(b.1, verified: true)) }
    }

    func make(_ n: Int = 2, readReplication: Bool = true, queueSize: Int = 0, threads: Int = 1) throws -> Setup {
        let metrics = MetricScope.standalone("storage")
        let disks = try (0..<n).map { _ in try DiskStorage(root: tempDir()) }
        let replicas = disks.map { InstrumentedStorage($0) }
        let s = try ReplicatedStorage(
            replicas: replicas.enumerated().map { VerifyingStorage($1, sourceName: "replica \($0)", metrics: metrics) },
            readReplication: readReplication, replicationQueueSize: queueSize, replicationThreads: threads, metrics: metrics)
        try s.start()
        addTeardownBlock { try? s.stop() }
        return Setup(s: s, replicas: replicas, disks: disks, metrics: metrics)
    }

    func testNeedsTwoReplicas() {
        XCTAssertThrowsError(try ReplicatedStorage(replicas: [MemoryStorage(maxBytes: 10)], readReplication: true,
                                                   replicationQueueSize: 0, replicationThreads: 1))
    }

    func testWritesGoEverywhereAndFailOnlyWhenAllFail() throws {
        let t = try make(3)
        let b = blob("everywhere")
        try t.s.commitWrite(b.0, DataSource(b.1, verified: true))
        XCTAssertTrue((0..<3).allSatisfy { t.has($0, b.0) })

        let c = blob("partial")
        t.replicas[0].failWrites.store(true, ordering: .relaxed)
        t.replicas[2].failWrites.store(true, ordering: .relaxed)
        XCTAssertNoThrow(try t.s.commitWrite(c.0, DataSource(c.1, verified: true)), "one replica took it")
        XCTAssertEqual((0..<3).map { t.has($0, c.0) }, [false, true, false])

        t.replicas[1].failWrites.store(true, ordering: .relaxed)
        let d = blob("nowhere")
        XCTAssertThrowsError(try t.s.commitWrite(d.0, DataSource(d.1, verified: true))) {
            XCTAssertEqual(($0 as? StorageError)?.errno, ENOSPC)
        }
    }

    func testSkipsWriteOnlyWhenEveryReplicaHasIt() throws {
        let t = try make()
        let b = blob("rewrite fills")
        try t.put(0, b)
        XCTAssertFalse(try t.s.skipsWrite(b.0, DataSource(b.1)))
        try t.put(1, b)
        XCTAssertTrue(try t.s.skipsWrite(b.0, DataSource(b.1)))
    }

    /// getBlob reads the first replica that has the blob and writes it into
    /// every replica that lacks it, before and after that one.
    func testGetBlobRepairsEveryReplicaLackingIt() throws {
        let t = try make(3)
        let b = blob("only in the middle")
        try t.put(1, b)
        XCTAssertEqual(try t.s.getBlob(b.0)?.readAll(), b.1)
        XCTAssertEqual((0..<3).map { t.has($0, b.0) }, [true, true, true])
        XCTAssertEqual(t.metrics.value(MetricCatalog.replicaRepairs), 2)
        XCTAssertEqual(t.replicas[2].getCalls.load(ordering: .relaxed), 0, "read from the first replica that has it")
    }

    func testNoRepairWithoutReadReplication() throws {
        let t = try make(readReplication: false)
        let b = blob("left alone")
        try t.put(1, b)
        XCTAssertEqual(try t.s.getBlob(b.0)?.readAll(), b.1)
        XCTAssertEqual(try t.s.bulkReadBlobs([b.0]), [b.0: b.1])
        XCTAssertEqual(try t.s.read(b.0, offset: 0, length: 4), Data("left".utf8))
        XCTAssertFalse(t.has(0, b.0))
        XCTAssertEqual(t.s.pendingReplications, 0)
    }

    /// Opens and ranged reads stay cheap: the replica tried first and found
    /// lacking is repaired in the background.
    func testOpenAndReadRepairInTheBackground() throws {
        let t = try make()
        let b = blob("opened from the second replica")
        try t.put(1, b)
        XCTAssertEqual(try t.s.openBlob(b.0)?.readAll(), b.1)
        XCTAssertTrue(pollUntil(60) { t.has(0, b.0) }, "replica 0 repaired")

        let c = blob("read from the second replica")
        try t.put(1, c)
        XCTAssertEqual(try t.s.read(c.0, offset: 5, length: 4), Data("from".utf8))
        XCTAssertTrue(pollUntil(60) { t.has(0, c.0) })
        XCTAssertEqual(t.metrics.value(MetricCatalog.replicaRepairs), 2)
    }

    func testBulkReadRepairsEachReplica() throws {
        let t = try make()
        let onlyFirst = (0..<5).map { blob("first \($0)") }
        let onlySecond = (0..<5).map { blob("second \($0)") }
        for b in onlyFirst { try t.put(0, b) }
        for b in onlySecond { try t.put(1, b) }
        let absent = blob("absent")
        let all = onlyFirst + onlySecond
        let got = try t.s.bulkReadBlobs(all.map(\.0) + [absent.0])
        XCTAssertEqual(got.count, 10)
        for (d, data) in all {
            XCTAssertEqual(got[d], data)
            XCTAssertTrue(t.has(0, d) && t.has(1, d), "\(d) in both replicas after the read")
        }
        XCTAssertEqual(t.metrics.value(MetricCatalog.replicaRepairs), 10)
    }

    /// Missing = missing from all; blobs in only some replicas are copied in
    /// the background when the replication queue is on.
    func testMissingBlobsAndBackgroundReplication() throws {
        let off = try make()
        let b = blob("in one replica")
        try off.put(0, b)
        let absent = blob("in none")
        XCTAssertEqual(try off.s.missingBlobs([absent.0, b.0]), [absent.0])
        XCTAssertEqual(off.s.pendingReplications, 0)
        XCTAssertFalse(off.has(1, b.0), "no background replication with replication-queue-size 0")

        let on = try make(3, queueSize: 100, threads: 2)
        let blobs = (0..<20).map { blob("replicate \($0)") }
        for (i, x) in blobs.enumerated() { try on.put(i % 3, x) }
        XCTAssertEqual(try on.s.missingBlobs(blobs.map(\.0) + [absent.0]), [absent.0])
        XCTAssertTrue(pollUntil(60) { blobs.allSatisfy { x in (0..<3).allSatisfy { on.has($0, x.0) } } })
        XCTAssertEqual(on.metrics.value(MetricCatalog.replicaRepairs), 40)
    }

    /// A full queue drops (counted); the next check queues again.
    func testFullReplicationQueueDrops() throws {
        let t = try make(queueSize: 1)
        let blobs = (0..<3).map { blob("queued \($0)") }
        for x in blobs { try t.put(0, x) }
        let gate = DispatchSemaphore(value: 0)
        t.replicas[0].gate.withLock { $0 = gate }
        XCTAssertEqual(try t.s.missingBlobs([blobs[0].0]), [])
        XCTAssertEqual(try t.s.missingBlobs([blobs[1].0, blobs[2].0]), [])
        XCTAssertEqual(t.metrics.value(MetricCatalog.replicationDropped), 2)
        t.replicas[0].gate.withLock { $0 = nil }
        gate.signal()
        XCTAssertTrue(pollUntil(60) { t.has(1, blobs[0].0) && t.s.pendingReplications == 0 })
        XCTAssertFalse(t.has(1, blobs[1].0), "dropped, not queued")
        // Later checks queue them again, one at a time.
        XCTAssertTrue(pollUntil(60) {
            _ = try? t.s.missingBlobs([blobs[1].0, blobs[2].0])
            return t.has(1, blobs[1].0) && t.has(1, blobs[2].0)
        })
    }

    /// One status per blob, in request order, even for a repeated hash; a
    /// blob stored by any replica is a success.
    func testBulkUpdateStatuses() throws {
        let t = try make()
        let a = blob("a"), b = blob("b")
        t.replicas[0].failWrites.store(true, ordering: .relaxed)
        XCTAssertEqual(t.s.bulkUpdateBlobs([a, b, a]).map { $0 == nil }, [true, true, true])
        t.replicas[1].failWrites.store(true, ordering: .relaxed)
        let c = blob("c")
        let statuses = t.s.bulkUpdateBlobs([c, b, c])
        XCTAssertEqual(statuses.map { $0?.errno }, [ENOSPC, ENOSPC, ENOSPC])
    }

    func testBulkDeleteReportsEveryReplicasFailures() throws {
        let t = try make()
        let blobs = (0..<4).map { blob("delete \($0)") }
        XCTAssertTrue(t.s.bulkUpdateBlobs(blobs).allSatisfy { $0 == nil })
        t.replicas[1].failDeletes.store(true, ordering: .relaxed)
        XCTAssertEqual(t.s.bulkDelete(blobs.map(\.0)), blobs.map(\.0.hash))
        XCTAssertFalse(t.has(0, blobs[0].0))
        XCTAssertTrue(t.has(1, blobs[0].0))
        XCTAssertThrowsError(try t.s.deleteBlob(blobs[0].0))
    }

    func testSizeIsPartOfTheIdentity() throws {
        let t = try make()
        let b = blob("sized")
        try t.s.commitWrite(b.0, DataSource(b.1, verified: true))
        let other = try Digest(hash: b.0.hash, size: b.0.size + 1)
        XCTAssertEqual(try t.s.missingBlobs([b.0, other]), [other])
        XCTAssertNil(try t.s.getBlob(other))
    }

    /// A replica that fails is passed over; only when none can answer is
    /// the error thrown.
    func testOneReplicaDown() throws {
        let t = try make()
        let b = blob("survives")
        try t.s.commitWrite(b.0, DataSource(b.1, verified: true))
        t.replicas[0].failReads.store(true, ordering: .relaxed)
        XCTAssertTrue(try t.s.hasBlob(b.0))
        XCTAssertEqual(try t.s.getBlob(b.0)?.readAll(), b.1)
        XCTAssertEqual(try t.s.read(b.0, offset: 0, length: 3), Data("sur".utf8))
        XCTAssertEqual(try t.s.bulkReadBlobs([b.0]), [b.0: b.1])
        XCTAssertEqual(try t.s.missingBlobs([b.0]), [])
        XCTAssertGreaterThan(t.metrics.value(MetricCatalog.replicaErrors), 0)
        let absent = blob("not there")
        XCTAssertThrowsError(try t.s.getBlob(absent.0), "replica 1 lacks it and replica 0 cannot say")
        t.replicas[1].failReads.store(true, ordering: .relaxed)
        XCTAssertThrowsError(try t.s.getBlob(b.0))
        XCTAssertThrowsError(try t.s.missingBlobs([b.0]))
        XCTAssertThrowsError(try t.s.bulkReadBlobs([b.0]))
    }

    /// A replica holding wrong bytes fails its own check; the read is served
    /// by the next replica and the bad copy replaced.
    func testCorruptReplicaIsPassedOverAndRepaired() throws {
        let t = try make()
        let b = blob("the right bytes")
        try t.put(1, b)
        let path = t.disks[0].objectPath(b.0)
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent,
                                                withIntermediateDirectories: true)
        try Data("the wrong bytes".utf8).write(to: URL(fileURLWithPath: path))
        XCTAssertEqual(try t.s.getBlob(b.0)?.readAll(), b.1)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), b.1, "replica 0 repaired")
        XCTAssertEqual(t.metrics.value(MetricCatalog.verifyFailures), 1)
    }

    func testConcurrentReadersOfAMissingReplica() throws {
        let t = try make(3)
        let blobs = (0..<12).map { blob("concurrent \($0)") }
        for x in blobs { try t.put(2, x) }
        let errors = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 24) { i in
            let x = blobs[i % blobs.count]
            do {
                let data = i % 2 == 0 ? try t.s.getBlob(x.0)?.readAll() : try t.s.openBlob(x.0)?.readAll()
                if data != x.1 { errors.add(1, ordering: .relaxed) }
            } catch { errors.add(1, ordering: .relaxed) }
        }
        XCTAssertEqual(errors.load(ordering: .relaxed), 0)
        XCTAssertTrue(pollUntil(60) { blobs.allSatisfy { x in (0..<3).allSatisfy { t.has($0, x.0) } } })
    }
}
