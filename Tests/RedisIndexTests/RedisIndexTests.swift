import CASCore
import CASStorage
import Foundation
import Redis
import TestSupport
import XCTest

final class RedisIndexTests: XCTestCase {
    var server: RedisServer!
    var redis: RedisPool!
    var storage: FakeStorage!
    var index: RedisIndex!
    var metrics: MetricScope!

    override func setUpWithError() throws {
        server = try RedisServer.unixSocket()
        redis = server.pool()
        storage = FakeStorage()
        metrics = .standalone("index")
        index = try RedisIndex(redis: redis, storage: storage, metrics: metrics)
    }

    override func tearDown() {
        index = nil
        redis = nil
        server = nil
    }

    func key(_ d: Digest) -> String { "A:\(d.hash)_\(d.size)" }

    func testCommitWriteUsesBuildGridSchema() throws {
        let (d, data) = blob("foo")
        XCTAssertFalse(try index.hasBlob(d))
        try index.commitWrite(d, DataSource(data))
        XCTAssertTrue(try index.hasBlob(d))
        XCTAssertTrue(storage.contains(d))
        XCTAssertEqual(try redis.get(key(d)), "1")
        let ttl = try redis.ttl(key(d))
        XCTAssertGreaterThan(ttl, RedisIndex.ttlSeconds - 10)
        XCTAssertLessThanOrEqual(ttl, RedisIndex.ttlSeconds)
        XCTAssertEqual(try redis.get("total_size"), "3")
        XCTAssertEqual(try index.totalSize(), 3)
        XCTAssertEqual(try index.blobCount(), 1)
        XCTAssertEqual(index.key(d), "A:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae_3")
        // A second write of the same blob is not counted twice.
        try index.commitWrite(d, DataSource(data))
        XCTAssertEqual(try index.totalSize(), 3)
        XCTAssertEqual(try index.blobCount(), 1)
        XCTAssertEqual(try index.getBlob(d)?.readAll(), data)
        XCTAssertEqual(try index.read(d, offset: 1, length: 10), Data("oo".utf8))
    }

    func testSizeIsPartOfIdentity() throws {
        let (d, data) = blob("foo")
        try index.commitWrite(d, DataSource(data))
        let other = try Digest(hash: d.hash, size: 4)
        XCTAssertFalse(try index.hasBlob(other))
        XCTAssertEqual(try index.missingBlobs([d, other]), [other])
        XCTAssertNil(try index.getBlob(other))
        // Asking for the wrong size does not remove the right one.
        XCTAssertTrue(try index.hasBlob(d))
    }

    func testHasBlobDoesNotRefreshButMissingBlobsDoes() throws {
        let (d, data) = blob("aged")
        try index.commitWrite(d, DataSource(data))
        try redis.age(key(d), by: 3600)
        XCTAssertTrue(try index.hasBlob(d))
        XCTAssertLessThanOrEqual(try redis.ttl(key(d)), RedisIndex.ttlSeconds - 3600)
        let (absent, _) = blob("absent")
        XCTAssertEqual(try index.missingBlobs([absent, d, absent]), [absent, absent])
        XCTAssertGreaterThan(try redis.ttl(key(d)), RedisIndex.ttlSeconds - 10)
        XCTAssertFalse(try redis.exists(key(absent)), "EXPIRE must not create keys")
        XCTAssertEqual(try index.missingBlobs([]), [])
    }

    func testTouchRefreshesAccessTime() throws {
        let (d, data) = blob("touched")
        try index.commitWrite(d, DataSource(data))
        try redis.age(key(d), by: 7200)
        let (absent, _) = blob("never")
        try index.touch([d, absent, .empty])
        XCTAssertGreaterThan(try redis.ttl(key(d)), RedisIndex.ttlSeconds - 10)
        XCTAssertFalse(try redis.exists(key(absent)))
    }

    func testGetBlobDropsIndexEntryWhoseBytesAreGone() throws {
        let (d, data) = blob("vanishing")
        let (keep, keepData) = blob("keep")
        try index.commitWrite(d, DataSource(data))
        try index.commitWrite(keep, DataSource(keepData))
        storage.remove(d)
        XCTAssertTrue(try index.hasBlob(d), "the index is authoritative until a read finds out")
        XCTAssertNil(try index.getBlob(d))
        XCTAssertFalse(try index.hasBlob(d))
        XCTAssertEqual(try index.totalSize(), Int64(keepData.count))
        // A second miss does not lower the total again.
        XCTAssertNil(try index.getBlob(d))
        XCTAssertEqual(try index.totalSize(), Int64(keepData.count))
        XCTAssertEqual(Int64(metrics.value(MetricCatalog.indexOrphans)), 1)
    }

    func testRangeReadDropsIndexEntryWhoseBytesAreGone() throws {
        let (d, data) = blob("ranged")
        try index.commitWrite(d, DataSource(data))
        storage.remove(d)
        XCTAssertNil(try index.read(d, offset: 0, length: 3))
        XCTAssertFalse(try index.hasBlob(d))
        XCTAssertEqual(try index.totalSize(), 0)
    }

    func testBulkReadBlobsDropsOrphans() throws {
        let blobs = (0..<5).map { blob("bulk \($0)") }
        for (d, data) in blobs { try index.commitWrite(d, DataSource(data)) }
        storage.remove(blobs[1].0)
        storage.remove(blobs[3].0)
        let (never, _) = blob("never written")
        let got = try index.bulkReadBlobs(blobs.map(\.0) + [never, blobs[1].0])
        XCTAssertEqual(Set(got.keys), [blobs[0].0, blobs[2].0, blobs[4].0])
        XCTAssertEqual(got[blobs[2].0], blobs[2].1)
        XCTAssertFalse(try index.hasBlob(blobs[1].0))
        XCTAssertFalse(try index.hasBlob(blobs[3].0))
        XCTAssertTrue(try index.hasBlob(blobs[4].0))
        let expected = [0, 2, 4].reduce(Int64(0)) { $0 + blobs[$1].0.size }
        XCTAssertEqual(try index.totalSize(), expected)
    }

    func testDeleteBlob() throws {
        let (d, data) = blob("delete me")
        try index.commitWrite(d, DataSource(data))
        try index.deleteBlob(d)
        XCTAssertFalse(try index.hasBlob(d))
        XCTAssertFalse(storage.contains(d))
        XCTAssertEqual(try index.totalSize(), 0)
        // Deleting what is not indexed touches neither storage nor the total.
        try storage.commitWrite(d, DataSource(data))
        try index.deleteBlob(d)
        XCTAssertTrue(storage.contains(d), "a blob unknown to the index is not deleted from storage")
        XCTAssertEqual(try index.totalSize(), 0)
    }

    func testDeleteRacingWithReAddLeavesNoIndexEntryWithoutBytes() throws {
        let (d, data) = blob("raced")
        try index.commitWrite(d, DataSource(data))
        let other = try RedisIndex(redis: redis, storage: storage)
        // While the bytes are being deleted, another writer re-adds the blob to the index.
        storage.onDelete.withLock { $0 = { _ in try? other.commitWrite(d, DataSource(data)) } }
        try index.deleteBlob(d)
        storage.onDelete.withLock { $0 = nil }
        XCTAssertFalse(storage.contains(d))
        XCTAssertFalse(try index.hasBlob(d), "the index must not point at bytes that are gone")
        XCTAssertGreaterThanOrEqual(try index.totalSize(), 0)
    }

    func testBulkDeleteReportsStorageFailures() throws {
        let blobs = (0..<4).map { blob("bd \($0)") }
        for (d, data) in blobs { try index.commitWrite(d, DataSource(data)) }
        storage.failDelete(blobs[2].0)
        let (never, _) = blob("never")
        let failed = index.bulkDelete(blobs.map(\.0) + [never])
        XCTAssertEqual(failed, [blobs[2].0.hash])
        for (d, _) in blobs { XCTAssertFalse(try index.hasBlob(d)) }
        XCTAssertTrue(storage.contains(blobs[2].0))
        XCTAssertFalse(storage.contains(blobs[0].0))
        XCTAssertEqual(try index.totalSize(), 0)
    }

    func testBulkUpdateStoresOnlyMissingBlobs() throws {
        let present = blob("present")
        try index.commitWrite(present.0, DataSource(present.1))
        let writesBefore = storage.writes
        let fresh = (0..<3).map { blob("fresh \($0)") }
        let failing = blob("no room")
        storage.failWrite(failing.0)
        let input = [present, fresh[0], fresh[1], failing, fresh[2], fresh[0]]
        let statuses = index.bulkUpdateBlobs(input)
        XCTAssertEqual(statuses.count, input.count)
        XCTAssertEqual(statuses.map { $0 == nil }, [true, true, true, false, true, true])
        if case .storageFull? = statuses[3] {} else { XCTFail("\(String(describing: statuses[3]))") }
        XCTAssertEqual(storage.writes - writesBefore, 4, "the present blob is not rewritten")
        XCTAssertFalse(try index.hasBlob(failing.0))
        for (d, _) in fresh { XCTAssertTrue(try index.hasBlob(d)) }
        let expected = ([present] + fresh).reduce(Int64(0)) { $0 + $1.0.size }
        XCTAssertEqual(try index.totalSize(), expected, "a duplicate in one request is counted once")
        XCTAssertEqual(try index.blobCount(), 4)
        XCTAssertEqual(index.bulkUpdateBlobs([]).count, 0)
    }

    func testBlobCountIgnoresTheCounterKey() throws {
        XCTAssertEqual(try index.blobCount(), 0)
        let (d, data) = blob("one")
        try index.commitWrite(d, DataSource(data))
        XCTAssertEqual(try index.blobCount(), 1)
        try index.deleteBlob(d)
        XCTAssertTrue(try redis.exists("total_size"))
        XCTAssertEqual(try index.blobCount(), 0)
    }

    func testPrefixes() throws {
        XCTAssertThrowsError(try RedisIndex(redis: redis, storage: storage, prefix: "A"))
        XCTAssertEqual(try RedisIndex(redis: redis, storage: storage, prefix: nil).prefix, "A")
        XCTAssertEqual(try RedisIndex(redis: redis, storage: storage, prefix: "").totalSizeKey, "total_size")
        let p = try RedisIndex(redis: redis, storage: FakeStorage(), prefix: "P")
        XCTAssertEqual(p.totalSizeKey, "P:total_size")
        let (d, data) = blob("prefixed")
        try p.commitWrite(d, DataSource(data))
        XCTAssertTrue(try redis.exists("P:\(d)"))
        XCTAssertEqual(try redis.get("P:total_size"), String(data.count))
        XCTAssertFalse(try index.hasBlob(d), "another prefix is another index")
        XCTAssertEqual(try index.totalSize(), 0)
        XCTAssertEqual(try p.listPage(cursor: 0, count: 100).digests, [d])
        // Glob characters in a prefix are matched literally.
        let g = try RedisIndex(redis: redis, storage: FakeStorage(), prefix: "g*")
        XCTAssertEqual(try g.listPage(cursor: 0, count: 100).digests, [])
    }

    func testListPageWalksAllDigestsAndSkipsOtherKeys() throws {
        let blobs = (0..<25).map { blob("list \($0)") }
        for (d, data) in blobs { try index.commitWrite(d, DataSource(data)) }
        try redis.command("SET", "A:not-a-digest", "1").checked()
        try redis.command("SET", "A:\(blobs[0].0.hash)_01", "1").checked()  // leading zero: not a digest name
        try redis.command("SET", "B:\(blobs[0].0)", "1").checked()
        var cursor: UInt64 = 0
        var seen = Set<Digest>()
        var pages = 0
        repeat {
            let page = try index.listPage(cursor: cursor, count: 5)
            seen.formUnion(page.digests)
            cursor = page.cursor
            pages += 1
        } while cursor != 0
        XCTAssertEqual(seen, Set(blobs.map(\.0)))
        XCTAssertGreaterThan(pages, 1)
    }

    // MARK: delete_n_bytes

    func testDeleteNBytesDeletesOnlyBlobsAccessedBeforeTheProtectionTime() throws {
        let old = (0..<4).map { blob(bytes: 100, seed: UInt8($0)) }
        let fresh = (0..<3).map { blob(bytes: 100, seed: UInt8(100 + $0)) }
        for (d, data) in old + fresh { try index.commitWrite(d, DataSource(data)) }
        for (d, _) in old { try redis.age(key(d), by: 2 * 3600) }
        let protect = Date().addingTimeInterval(-3600)

        // Dry run: reports, changes nothing.
        XCTAssertEqual(try index.deleteNBytes(10_000, dryRun: true, rules: CleanupRules(protectBlobsAfter: protect)), 400)
        for (d, _) in old { XCTAssertTrue(try index.hasBlob(d)) }
        XCTAssertEqual(try index.totalSize(), 700)

        XCTAssertEqual(try index.deleteNBytes(10_000, rules: CleanupRules(protectBlobsAfter: protect)), 400)
        for (d, _) in old {
            XCTAssertFalse(try index.hasBlob(d))
            XCTAssertFalse(storage.contains(d))
        }
        for (d, _) in fresh { XCTAssertTrue(try index.hasBlob(d)) }
        XCTAssertEqual(try index.totalSize(), 300)
        XCTAssertEqual(try index.deleteNBytes(10_000, rules: CleanupRules(protectBlobsAfter: protect)), 0)
    }

    func testDeleteNBytesDefaultProtectionIsNow() throws {
        let blobs = (0..<3).map { blob(bytes: 10, seed: UInt8($0)) }
        for (d, data) in blobs { try index.commitWrite(d, DataSource(data)) }
        try redis.age(key(blobs[0].0), by: 1)
        XCTAssertEqual(try index.deleteNBytes(1_000), 30)
        XCTAssertEqual(try index.totalSize(), 0)
        XCTAssertEqual(try index.blobCount(), 0)
    }

    func testDeleteNBytesStopsAfterAboutNBytesAndResumes() throws {
        let blobs = (0..<10).map { blob(bytes: 100, seed: UInt8($0)) }
        for (d, data) in blobs { try index.commitWrite(d, DataSource(data)) }
        for (d, _) in blobs { try redis.age(key(d), by: 7200) }
        let protect = Date().addingTimeInterval(-3600)
        XCTAssertEqual(try index.deleteNBytes(250, rules: CleanupRules(protectBlobsAfter: protect)), 300)
        XCTAssertEqual(try index.blobCount(), 7)
        XCTAssertEqual(try index.totalSize(), 700)
        XCTAssertEqual(try index.deleteNBytes(150, rules: CleanupRules(protectBlobsAfter: protect)), 200)
        XCTAssertEqual(try index.blobCount(), 5)
        XCTAssertEqual(try index.deleteNBytes(10_000, rules: CleanupRules(protectBlobsAfter: protect)), 500)
        XCTAssertEqual(try index.blobCount(), 0)
        XCTAssertEqual(try index.totalSize(), 0)
    }

    func testDeleteNBytesLargeBlobLifetime() throws {
        let small = blob(bytes: 100, seed: 1)
        let large = blob(bytes: 5000, seed: 2)
        let largeRecent = blob(bytes: 5000, seed: 3)
        for (d, data) in [small, large, largeRecent] { try index.commitWrite(d, DataSource(data)) }
        try redis.age(key(small.0), by: 1800)
        try redis.age(key(large.0), by: 1800)
        try redis.age(key(largeRecent.0), by: 60)
        let protect = Date().addingTimeInterval(-3600)
        let lifetime = Date().addingTimeInterval(-600)
        // Without a large-blob rule nothing is old enough.
        XCTAssertEqual(try index.deleteNBytes(100_000, dryRun: true, rules: CleanupRules(protectBlobsAfter: protect)), 0)
        XCTAssertEqual(
            try index.deleteNBytes(100_000, rules: CleanupRules(protectBlobsAfter: protect, largeBlobThreshold: 1000, largeBlobLifetime: lifetime)),
            5000)
        XCTAssertFalse(try index.hasBlob(large.0))
        XCTAssertTrue(try index.hasBlob(small.0))
        XCTAssertTrue(try index.hasBlob(largeRecent.0))
        XCTAssertEqual(try index.totalSize(), 5100)
    }

    func testDeleteNBytesWithNonDefaultPrefixSkipsCounterAndForeignKeys() throws {
        let p = try RedisIndex(redis: redis, storage: storage, prefix: "P")
        let blobs = (0..<6).map { blob(bytes: 10, seed: UInt8($0)) }
        for (d, data) in blobs { try p.commitWrite(d, DataSource(data)) }
        try redis.command("SET", "P:garbage", "1").checked()
        try redis.command("SET", "A:\(blobs[0].0)", "1").checked()
        // Age every other blob; the counter key P:total_size is in the same SCAN.
        for (i, (d, _)) in blobs.enumerated() where i % 2 == 0 { try redis.age("P:\(d)", by: 7200) }
        let protect = Date().addingTimeInterval(-3600)
        XCTAssertEqual(try p.deleteNBytes(1_000, rules: CleanupRules(protectBlobsAfter: protect)), 30)
        for (i, (d, _)) in blobs.enumerated() {
            XCTAssertEqual(try p.hasBlob(d), i % 2 == 1, "blob \(i)")
        }
        XCTAssertEqual(try redis.get("P:total_size"), "30")
        XCTAssertTrue(try redis.exists("P:garbage"))
        XCTAssertTrue(try redis.exists("A:\(blobs[0].0)"))
    }

    func testDeleteNBytesTreatsKeysWithoutExpiryAsOld() throws {
        let (d, data) = blob("persistent")
        try index.commitWrite(d, DataSource(data))
        try redis.command("PERSIST", key(d)).checked()
        XCTAssertEqual(try index.deleteNBytes(1, rules: CleanupRules(protectBlobsAfter: Date().addingTimeInterval(-86_400))), d.size)
    }

    // MARK: LRU order

    func testLeastRecentDigestsOrderIncludesPlainKeysFromOtherWriters() throws {
        let blobs = (0..<5).map { blob("lru \($0)") }
        for (d, data) in blobs { try index.commitWrite(d, DataSource(data)) }
        // A blob indexed by another server (BuildGrid): only the plain key.
        let foreign = blob("written by buildgrid")
        try storage.commitWrite(foreign.0, DataSource(foreign.1))
        try redis.command(["SET", .string(key(foreign.0)), "1", "EX", .integer(RedisIndex.ttlSeconds), "NX"]).checked()
        // Ages: blob 3 oldest, then foreign, blob 0, blob 4, blob 1, blob 2 newest.
        let ages: [(String, Int64)] = [
            (key(blobs[3].0), 5000), (key(foreign.0), 4000), (key(blobs[0].0), 3000),
            (key(blobs[4].0), 2000), (key(blobs[1].0), 1000),
        ]
        for (k, a) in ages { try redis.age(k, by: a) }
        let expected = [blobs[3].0, foreign.0, blobs[0].0, blobs[4].0, blobs[1].0, blobs[2].0]
        XCTAssertEqual(try index.leastRecentDigests(limit: 100), expected)
        XCTAssertEqual(try index.leastRecentDigests(limit: 2), Array(expected.prefix(2)))
        XCTAssertEqual(try index.leastRecentDigests(limit: 0), [])
        // An access moves a blob to the end; has_blob does not.
        XCTAssertTrue(try index.hasBlob(blobs[3].0))
        XCTAssertEqual(try index.leastRecentDigests(limit: 1), [blobs[3].0])
        usleep(5_000)  // access times have millisecond resolution
        _ = try index.missingBlobs([blobs[3].0])
        XCTAssertEqual(try index.leastRecentDigests(limit: 100).last, blobs[3].0)
        XCTAssertEqual(try index.leastRecentDigests(limit: 1), [foreign.0])
    }

    func testLeastRecentDigestsUsesMillisecondPrecision() throws {
        let blobs = (0..<3).map { blob("ms \($0)") }
        for (d, data) in blobs { try index.commitWrite(d, DataSource(data)) }
        let ttlMs = RedisIndex.ttlSeconds * 1000
        // Within one second of each other: 2 older than 0 older than 1.
        for (i, offset) in [(2, 900), (0, 500), (1, 100)] {
            try redis.command(["PEXPIRE", .string(key(blobs[i].0)), .integer(ttlMs - Int64(offset))]).checked()
        }
        XCTAssertEqual(try index.leastRecentDigests(limit: 3), [blobs[2].0, blobs[0].0, blobs[1].0])
    }

    func testLeastRecentDigestsAcrossManyPages() throws {
        let blobs = (0..<2500).map { blob(bytes: 8, seed: 0).1 + Data("\($0)".utf8) }.map { (Digest.of($0), $0) }
        XCTAssertTrue(index.bulkUpdateBlobs(blobs).allSatisfy { $0 == nil })
        let oldest = Array(blobs.suffix(3).map(\.0))
        for (i, d) in oldest.enumerated() { try redis.age(key(d), by: Int64(1000 - i)) }
        XCTAssertEqual(try index.leastRecentDigests(limit: 3), oldest)
        XCTAssertEqual(try index.leastRecentDigests(limit: 5000).count, 2500)
        XCTAssertEqual(try index.blobCount(), 2500)
    }

    // MARK: failures

    func testDeadRedisSurfacesAsUnavailable() throws {
        let (d, data) = blob("before")
        try index.commitWrite(d, DataSource(data))
        server.stop()
        func assertUnavailable(_ body: @autoclosure () throws -> Any, line: UInt = #line) {
            XCTAssertThrowsError(try body(), line: line) { error in
                guard case StorageError.unavailable = error else { return XCTFail("\(error)", line: line) }
            }
        }
        assertUnavailable(try index.hasBlob(d))
        assertUnavailable(try index.missingBlobs([d]))
        assertUnavailable(try index.commitWrite(blob("x").0, DataSource(Data("x".utf8))))
        assertUnavailable(try index.totalSize())
        assertUnavailable(try index.deleteNBytes(10))
        assertUnavailable(try index.leastRecentDigests(limit: 1))
        let statuses = index.bulkUpdateBlobs([blob("y")])
        XCTAssertNotNil(statuses[0])
        XCTAssertEqual(index.bulkDelete([d]), [d.hash])
        // Reads still serve what the storage has.
        XCTAssertEqual(try index.getBlob(d)?.readAll(), data)
        try server.start()
        XCTAssertFalse(try eventually { try index.hasBlob(d) }, "the restarted server lost its data")
    }
}
