import CASCore
import CASStorage
import Foundation
import XCTest

final class VerifyingStorageTests: XCTestCase {
    func make(limit: Int64 = 64 << 20) throws -> (VerifyingStorage, DiskStorage, MetricScope) {
        let disk = try DiskStorage(root: tempDir())
        let m = MetricScope.standalone("v")
        return (VerifyingStorage(disk, sourceName: "disk", wholeCheckLimit: limit, metrics: m), disk, m)
    }

    /// Writes `data` as the object of `d` behind the store's back (no proof).
    func plant(_ disk: DiskStorage, _ d: Digest, _ data: Data) throws {
        let p = disk.objectPath(d)
        try FileManager.default.createDirectory(atPath: (p as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try data.write(to: URL(fileURLWithPath: p))
    }

    func testFileWrittenThroughTheStoreIsTrustedWithoutHashing() throws {
        let (v, disk, m) = try make()
        let (d, data) = blob("written by casfs")
        try disk.commitWrite(d, DataSource(data))
        let src = try XCTUnwrap(v.openBlob(d))
        XCTAssertTrue(src.isVerified)
        XCTAssertEqual(try src.readAll(), data)
        XCTAssertEqual(m.value(MetricCatalog.verifications), 0)
    }

    func testForeignFileIsHashedOnceThenCarriesAProof() throws {
        let (v, disk, m) = try make()
        let (d, data) = blob("written by someone else")
        try plant(disk, d, data)
        XCTAssertFalse(try XCTUnwrap(disk.openBlob(d)).isVerified)
        XCTAssertEqual(try v.openBlob(d)?.readAll(), data)
        XCTAssertEqual(m.value(MetricCatalog.verifications), 1)
        // A new store object (a restart) sees the proof: no second hash.
        let again = VerifyingStorage(try DiskStorage(root: disk.root), sourceName: "disk", metrics: m)
        XCTAssertTrue(try XCTUnwrap(again.openBlob(d)).isVerified)
        XCTAssertEqual(m.value(MetricCatalog.verifications), 1)
    }

    func testChangedFileLosesItsProofAndCorruptionIsRepaired() throws {
        let (v, disk, m) = try make()
        let (d, data) = blob("soon to be damaged")
        try disk.commitWrite(d, DataSource(data))
        var bad = data
        bad[0] ^= 1
        // Same length, new content, written in place (new mtime).
        usleep(10_000)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: disk.objectPath(d)))
        try fh.write(contentsOf: bad)
        try fh.close()
        XCTAssertThrowsError(try v.openBlob(d)) { e in
            guard case StorageError.corrupt(let cd, _) = e else { return XCTFail("\(e)") }
            XCTAssertEqual(cd, d)
        }
        XCTAssertEqual(m.value(MetricCatalog.verifyFailures), 1)
        XCTAssertFalse(try disk.hasBlob(d), "the corrupt object was removed")
        XCTAssertNil(try v.openBlob(d), "the next reader gets ENOENT, not the same bytes")
    }

    func testLargeBlobStreamsInOrderAndTheLastReadVerifies() throws {
        let (v, disk, _) = try make(limit: 1 << 10)
        var data = patterned(1 << 20)
        let d = Digest.of(data)
        data[data.count - 1] ^= 0xff  // corrupt near the end
        try plant(disk, d, data)
        let src = try XCTUnwrap(v.openBlob(d))
        XCTAssertFalse(src.isVerified)
        // In-order reads before the end are served as they are hashed.
        var off: Int64 = 0
        while off + (128 << 10) < d.size {
            XCTAssertEqual(try src.read(offset: off, length: 128 << 10).count, 128 << 10)
            off += 128 << 10
        }
        // The read that reaches the end fails, and so does every later one.
        XCTAssertThrowsError(try src.read(offset: off, length: 128 << 10))
        XCTAssertThrowsError(try src.read(offset: 0, length: 10))
        XCTAssertFalse(try disk.hasBlob(d))
    }

    func testJumpAheadWaitsForTheWholeCheck() throws {
        let (v, disk, m) = try make(limit: 1 << 10)
        var data = patterned(1 << 20)
        let d = Digest.of(data)
        data[10] ^= 0xff
        try plant(disk, d, data)
        let src = try XCTUnwrap(v.openBlob(d))
        // A ranged read in the middle checks the whole blob first.
        XCTAssertThrowsError(try src.read(offset: 512 << 10, length: 4096)) { e in
            guard case StorageError.corrupt = e else { return XCTFail("\(e)") }
        }
        XCTAssertEqual(m.value(MetricCatalog.verifyFailures), 1)
    }

    func testLargeGoodBlobGetsItsProofAfterAFullRead() throws {
        let (v, disk, _) = try make(limit: 1 << 10)
        let data = patterned(1 << 20)
        let d = Digest.of(data)
        try plant(disk, d, data)
        let src = try XCTUnwrap(v.openBlob(d))
        var got = Data()
        while Int64(got.count) < d.size { got.append(try src.read(offset: Int64(got.count), length: 100_000)) }
        XCTAssertEqual(got, data)
        XCTAssertTrue(try XCTUnwrap(v.openBlob(d)).isVerified)
    }

    func testBulkReadDropsAndRepairsCorruptBlobs() throws {
        let (v, disk, _) = try make()
        let (good, gdata) = blob("good")
        let (bad, bdata) = blob("bad!")
        try plant(disk, good, gdata)
        try plant(disk, bad, Data("bad?".utf8))
        XCTAssertEqual(try v.bulkReadBlobs([good, bad]), [good: gdata])
        XCTAssertFalse(try disk.hasBlob(bad))
        _ = bdata
    }
}
