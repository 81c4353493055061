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
}
