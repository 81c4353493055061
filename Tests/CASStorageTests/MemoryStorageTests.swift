import CASCore
import CASStorage
import Foundation
import XCTest

final class MemoryStorageTests: XCTestCase {
    func testStoresAndReads() throws {
        let m = MemoryStorage(maxBytes: 1000)
        let (d, data) = blob("hello")
        XCTAssertFalse(try m.hasBlob(d))
        XCTAssertNil(try m.getBlob(d))
        try m.commitWrite(d, DataSource(data))
        XCTAssertTrue(try m.hasBlob(d))
        XCTAssertEqual(try m.getBlob(d)?.readAll(), data)
        XCTAssertEqual(try m.read(d, offset: 1, length: 3), Data("ell".utf8))
        try m.deleteBlob(d)
        XCTAssertFalse(try m.hasBlob(d))
    }

    func testSizeIsIdentity() throws {
        let m = MemoryStorage(maxBytes: 1000)
        let (d, data) = blob("hello")
        try m.commitWrite(d, DataSource(data))
        let other = try Digest(hash: d.hash, size: 6)
        XCTAssertFalse(try m.hasBlob(other))
    }

    func testEvictsLeastRecentlyUsed() throws {
        let m = MemoryStorage(maxBytes: 30)
        let blobs = (0..<3).map { blob(String(repeating: "\($0)", count: 10)) }
        for (d, data) in blobs { try m.commitWrite(d, DataSource(data)) }
        _ = try m.getBlob(blobs[0].0) // 0 becomes most recent
        let (d4, data4) = blob(String(repeating: "x", count: 10))
        try m.commitWrite(d4, DataSource(data4))
        XCTAssertTrue(try m.hasBlob(blobs[0].0))
        XCTAssertFalse(try m.hasBlob(blobs[1].0), "least recently used must go first")
        XCTAssertTrue(try m.hasBlob(blobs[2].0))
        XCTAssertTrue(try m.hasBlob(d4))
        XCTAssertEqual(m.usedBytes, 30)
    }

    func testRejectsBlobLargerThanCapacity() throws {
        let m = MemoryStorage(maxBytes: 4)
        let (d, data) = blob("hello")
        XCTAssertThrowsError(try m.commitWrite(d, DataSource(data))) { e in
            guard case StorageError.storageFull = e else { return XCTFail("\(e)") }
        }
    }

    func testRejectsWrongLength() throws {
        let m = MemoryStorage(maxBytes: 100)
        let (d, _) = blob("hello")
        XCTAssertThrowsError(try m.commitWrite(d, DataSource(Data("hell".utf8))))
        XCTAssertFalse(try m.hasBlob(d))
    }

    func testBulkOperations() throws {
        let m = MemoryStorage(maxBytes: 1000)
        let blobs = ["a", "b", "c"].map(blob)
        XCTAssertEqual(m.bulkUpdateBlobs(blobs).compactMap { $0 }.count, 0)
        let absent = blob("zz").0
        XCTAssertEqual(try m.missingBlobs(blobs.map(\.0) + [absent]), [absent])
        let read = try m.bulkReadBlobs(blobs.map(\.0) + [absent])
        XCTAssertEqual(read.count, 3)
        XCTAssertEqual(read[blobs[1].0], blobs[1].1)
        XCTAssertEqual(m.bulkDelete(blobs.map(\.0)), [])
        XCTAssertEqual(try m.missingBlobs(blobs.map(\.0)).count, 3)
    }

    func testConcurrentUse() throws {
        let m = MemoryStorage(maxBytes: 5000)
        DispatchQueue.concurrentPerform(iterations: 400) { i in
            let (d, data) = blob("blob-\(i % 100)-" + String(repeating: "x", count: i % 37))
            try! m.commitWrite(d, DataSource(data))
            if let got = try! m.getBlob(d) { XCTAssertEqual(try! got.readAll(), data) }
        }
        XCTAssertLessThanOrEqual(m.usedBytes, 5000)
    }

    /// The budget covers every blob buffer alive: blobs that readers hold
    /// are not evicted (that would free nothing), a blob deleted while read
    /// counts until its reader lets go, and a new blob that finds no room is
    /// refused (not waited for) rather than exceeding the budget.
    func testBlobsHeldByReadersCountAgainstTheBudget() throws {
        let m = MemoryStorage(maxBytes: 30)
        let blobs = (0..<3).map { blob(String(repeating: "\($0)", count: 10)) }
        for (d, data) in blobs { try m.commitWrite(d, DataSource(data)) }
        var held = try blobs.map { try XCTUnwrap(m.getBlob($0.0)) }
        let (d4, data4) = blob(String(repeating: "x", count: 10))
        XCTAssertThrowsError(try m.commitWrite(d4, DataSource(data4))) { e in
            guard case StorageError.storageFull = e else { return XCTFail("\(e)") }
        }
        XCTAssertEqual(m.usedBytes, 30, "blobs being read were evicted")
        try m.deleteBlob(blobs[1].0)
        XCTAssertEqual(m.usedBytes, 20)
        XCTAssertEqual(m.heldBytes, 30, "a deleted blob still read left the budget")
        XCTAssertEqual(try held[1].readAll(), blobs[1].1, "a deleted blob stays readable to its reader")
        XCTAssertThrowsError(try m.commitWrite(d4, DataSource(data4)))
        held.remove(at: 1)
        XCTAssertEqual(m.heldBytes, 20)
        try m.commitWrite(d4, DataSource(data4))
        held.removeAll()
        // Unheld now: the next blob evicts the least recently used.
        let (d5, data5) = blob(String(repeating: "y", count: 10))
        try m.commitWrite(d5, DataSource(data5))
        XCTAssertFalse(try m.hasBlob(blobs[0].0))
        XCTAssertEqual(m.heldBytes, 30)
    }

    /// A memory cache short of room for now: the read is served by the
    /// fallback, and the blob is cached by a later read once there is room.
    func testCacheShortOfRoomServesFromTheFallback() throws {
        let cache = MemoryStorage(maxBytes: 20)
        let fallback = MemoryStorage(maxBytes: 1000)
        let s = WithCacheStorage(cache: cache, fallback: fallback)
        let blobs = (0..<3).map { blob(String(repeating: "\($0)", count: 10)) }
        for (d, data) in blobs { try fallback.commitWrite(d, DataSource(data)) }
        var held = try blobs.prefix(2).map { try XCTUnwrap(s.getBlob($0.0)) }
        XCTAssertEqual(cache.heldBytes, 20)
        XCTAssertEqual(try s.getBlob(blobs[2].0)?.readAll(), blobs[2].1)
        XCTAssertFalse(try cache.hasBlob(blobs[2].0))
        held.removeAll()
        XCTAssertEqual(try s.getBlob(blobs[2].0)?.readAll(), blobs[2].1)
        XCTAssertTrue(try cache.hasBlob(blobs[2].0), "the blob was not cached once there was room")
    }
}
