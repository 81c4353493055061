import CASCore
import CASStorage
import Foundation
import Synchronization
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

    /// A reader that finds its (unproven) copy damaged removes that copy
    /// only: a verified rewrite that replaced it while it was read stays.
    func testADamagedReadDoesNotRemoveTheRewriteThatReplacedIt() throws {
        let (v, disk, m) = try make(limit: 1 << 20)
        let data = patterned(3 << 20)
        let d = Digest.of(data)
        var bad = data
        bad[2 << 20] ^= 1
        try plant(disk, d, bad)
        let src = try XCTUnwrap(v.openBlob(d))
        XCTAssertFalse(src.isVerified)
        XCTAssertEqual(try src.read(offset: 0, length: 1 << 20), data.subdata(in: 0..<(1 << 20)))
        try disk.commitWrite(d, DataSource(data))  // a verified rewrite replaces the damaged file
        XCTAssertThrowsError(try src.read(offset: 1 << 20, length: 2 << 20)) { e in
            guard case StorageError.corrupt = e else { return XCTFail("\(e)") }
        }
        XCTAssertEqual(m.value(MetricCatalog.verifyFailures), 1)
        XCTAssertEqual(try v.openBlob(d)?.readAll(), data, "the rewrite is still there")
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

/// Readers of one large unverified blob proceed in parallel: a reader of a
/// range already hashed is not held up by the reader extending the hash,
/// which reads without a lock; the read that reaches the end still waits
/// for the whole check.
final class StreamCheckConcurrencyTests: XCTestCase {
    /// Serves `data`; reads at or past `gateAt` wait until the gate opens.
    final class GatedStorage: Storage, @unchecked Sendable {
        let data: Data
        let gateAt: Int64
        let gate = DispatchSemaphore(value: 0)
        let blocked = DispatchSemaphore(value: 0)
        init(_ data: Data, gateAt: Int64) {
            self.data = data
            self.gateAt = gateAt
        }
        func hasBlob(_ d: Digest) throws -> Bool { true }
        func getBlob(_ d: Digest) throws -> BlobSource? { try openBlob(d) }
        func openBlob(_ d: Digest) throws -> BlobSource? {
            let data = self.data, gateAt = self.gateAt, gate = self.gate, blocked = self.blocked
            return RangeSource(size: Int64(data.count)) { offset, length in
                if offset >= gateAt {
                    blocked.signal()
                    gate.wait()
                    gate.signal()
                }
                return data.subdata(in: Int(offset)..<Int(offset) + length)
            }
        }
        func deleteBlob(_ d: Digest) throws {}
        func commitWrite(_ d: Digest, _ s: BlobSource) throws {}
    }

    func testReadersOfHashedRangesDoNotWaitForTheExtender() throws {
        let data = patterned(8 << 20)
        let d = Digest.of(data)
        let inner = GatedStorage(data, gateAt: 2 << 20)
        let v = VerifyingStorage(inner, sourceName: "gated", wholeCheckLimit: 1 << 20)
        let a = try XCTUnwrap(v.openBlob(d))
        let mib = 1 << 20
        XCTAssertEqual(try a.read(offset: 0, length: mib), data.prefix(mib))
        XCTAssertEqual(try a.read(offset: Int64(mib), length: mib), data.subdata(in: mib..<2 * mib))
        // A continues in order and blocks inside the source, as the extender.
        let aDone = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            XCTAssertEqual(try? a.read(offset: Int64(2 * mib), length: mib), data.subdata(in: 2 * mib..<3 * mib))
            aDone.signal()
        }
        XCTAssertEqual(inner.blocked.wait(timeout: .now() + 60), .success)
        // B reads what is hashed: it does not wait for A.
        let b = try XCTUnwrap(v.openBlob(d))
        let bDone = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            XCTAssertEqual(try? b.read(offset: 512 << 10, length: mib), data.subdata(in: (512 << 10)..<(512 << 10) + mib))
            bDone.signal()
        }
        XCTAssertEqual(bDone.wait(timeout: .now() + 60), .success, "a reader of a hashed range waited for the extender")
        // C reads the end: it cannot finish before the whole blob is checked.
        let c = try XCTUnwrap(v.openBlob(d))
        let cDone = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            XCTAssertEqual(try? c.read(offset: Int64(data.count - 100), length: 100), data.suffix(100))
            cDone.signal()
        }
        XCTAssertEqual(cDone.wait(timeout: .now() + 1), .timedOut, "the end was served before the blob was verified")
        inner.gate.signal()
        XCTAssertEqual(aDone.wait(timeout: .now() + 60), .success)
        XCTAssertEqual(cDone.wait(timeout: .now() + 60), .success)
        XCTAssertTrue(try XCTUnwrap(v.openBlob(d)).read(offset: 0, length: 1).count == 1)
    }

    func testManyReadersOfADamagedBlobAllFail() throws {
        var data = patterned(6 << 20)
        let d = Digest.of(data)
        data[5 << 20] ^= 0xff
        let inner = GatedStorage(data, gateAt: Int64.max)
        let v = VerifyingStorage(inner, sourceName: "damaged", wholeCheckLimit: 1 << 20)
        let served = Mutex<[Bool]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            guard let src = try? v.openBlob(d) else { return }
            var ok = true
            var off: Int64 = i % 2 == 0 ? 0 : Int64(i) << 19
            while off < d.size {
                guard (try? src.read(offset: off, length: 1 << 18)) != nil else { ok = false; break }
                off += 1 << 18
            }
            served.withLock { $0.append(ok) }
        }
        XCTAssertFalse(served.withLock { $0.contains(true) }, "a reader finished with damaged bytes")
    }
}
