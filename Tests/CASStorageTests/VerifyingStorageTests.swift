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
        let data = patterned(2 << 20)
        let d = Digest.of(data)
        try plant(disk, d, data)
        XCTAssertFalse(try XCTUnwrap(disk.openBlob(d)).isVerified)
        XCTAssertEqual(try v.openBlob(d)?.readAll(), data)
        XCTAssertEqual(m.value(MetricCatalog.verifications), 1)
        // A new store object (a restart) sees the proof: no second hash.
        let again = VerifyingStorage(try DiskStorage(root: disk.root), sourceName: "disk", metrics: m)
        XCTAssertTrue(try XCTUnwrap(again.openBlob(d)).isVerified)
        XCTAssertEqual(m.value(MetricCatalog.verifications), 1)
    }

    /// Small files keep their proof in memory only: hashed once per
    /// process, again after a restart (cheap), with no record on disk.
    func testSmallFileProofIsKeptInMemory() throws {
        let (v, disk, m) = try make()
        let (d, data) = blob("small and foreign")
        try plant(disk, d, data)
        XCTAssertEqual(try v.openBlob(d)?.readAll(), data)
        XCTAssertTrue(try XCTUnwrap(v.openBlob(d)).isVerified)
        XCTAssertEqual(m.value(MetricCatalog.verifications), 1)
        XCTAssertNil(try? FileManager.default.destinationOfSymbolicLink(atPath: disk.root + "/casfs-proofs/\(d.hash.prefix(2))/\(d.hash.dropFirst(2))"))
        let again = VerifyingStorage(try DiskStorage(root: disk.root), sourceName: "disk", metrics: m)
        XCTAssertEqual(try again.openBlob(d)?.readAll(), data)
        XCTAssertEqual(m.value(MetricCatalog.verifications), 2)
    }

    /// A proof binds the change time: bytes changed in place with the
    /// modification time set back (`touch -r`) void it, in this process
    /// and after a restart, for small and large files.
    func testChangeThatRestoresMtimeVoidsTheProof() throws {
        for size in [100, 3 << 20] {
            for restart in [false, true] {
                let (v, disk, m) = try make()
                let data = patterned(size)
                let d = Digest.of(data)
                try disk.commitWrite(d, DataSource(data))
                XCTAssertTrue(try XCTUnwrap(v.openBlob(d)).isVerified)
                let path = disk.objectPath(d)
                var before = stat()
                XCTAssertEqual(stat(path, &before), 0)
                let fd = open(path, O_WRONLY)
                var b: UInt8 = data[size / 2] ^ 0xff
                XCTAssertEqual(pwrite(fd, &b, 1, off_t(size / 2)), 1)
                close(fd)
                var times = [before.st_atim, before.st_mtim]
                XCTAssertEqual(utimensat(AT_FDCWD, path, &times, 0), 0)
                var after = stat()
                XCTAssertEqual(stat(path, &after), 0)
                XCTAssertEqual(after.st_mtim.tv_sec, before.st_mtim.tv_sec)
                XCTAssertEqual(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec)
                let store = restart ? VerifyingStorage(try DiskStorage(root: disk.root), sourceName: "disk", metrics: m) : v
                XCTAssertFalse(try XCTUnwrap(disk.openBlob(d)).isVerified, "\(size) bytes: the proof survived the change")
                XCTAssertThrowsError(try store.openBlob(d)?.readAll(), "\(size) bytes: damaged bytes were served") { e in
                    guard case StorageError.corrupt = e else { return XCTFail("\(e)") }
                }
            }
        }
    }

    /// A verified write of a blob whose stored copy is damaged but still
    /// proven (media damage changes no metadata) replaces the copy.
    func testVerifiedRewriteReplacesADamagedProvenCopy() throws {
        let (_, disk, _) = try make()
        let data = patterned(3 << 20)
        let d = Digest.of(data)
        try disk.commitWrite(d, DataSource(data))
        let path = disk.objectPath(d)
        let proven = try XCTUnwrap(disk.openBlob(d) as? BlobSource)
        XCTAssertTrue(proven.isVerified)
        // Damage without a trace in the metadata: the bytes change, then the
        // proof record is made to name the new change time (as if the
        // medium had changed under an unchanged inode).
        let fd = open(path, O_WRONLY)
        var b: UInt8 = data[12345] ^ 0x01
        XCTAssertEqual(pwrite(fd, &b, 1, 12345), 1)
        close(fd)
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        disk.recordProof(d, FileStamp(st))
        XCTAssertTrue(try XCTUnwrap(disk.openBlob(d)).isVerified, "the damage is invisible to the proof")
        XCTAssertFalse(try disk.skipsWrite(d, DataSource(data)), "a rewrite of a damaged copy is not skipped")
        try disk.commitWrite(d, DataSource(data))
        XCTAssertEqual(FileManager.default.contents(atPath: path), data, "the damaged copy was replaced")
        XCTAssertTrue(try disk.skipsWrite(d, DataSource(data)))
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
