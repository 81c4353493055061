import CASCore
import CASStorage
import Foundation
import XCTest

final class DiskStorageTests: XCTestCase {
    func testBuildGridLayout() throws {
        let root = tempDir()
        let s = try DiskStorage(root: root)
        let (d, data) = blob("foo")
        try s.commitWrite(d, DataSource(data))
        let path = "\(root)/cas/objects/2c/26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        XCTAssertEqual(s.objectPath(d), path)
        XCTAssertEqual(FileManager.default.contents(atPath: path), data)
        XCTAssertTrue(FileManager.default.fileExists(atPath: root + "/tmp"))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root + "/tmp"), [], "no temporaries left")
    }

    func testReadsExistingBuildGridObjects() throws {
        let root = tempDir()
        let (d, data) = blob("written by another server")
        let dir = "\(root)/cas/objects/\(d.hash.prefix(2))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try data.write(to: URL(fileURLWithPath: "\(dir)/\(d.hash.dropFirst(2))"))
        let s = try DiskStorage(root: root)
        XCTAssertTrue(try s.hasBlob(d))
        XCTAssertEqual(try s.read(d, offset: 11, length: 7), Data("another".utf8))
        var seen: [Digest] = []
        try s.forEachBlob { seen.append($0) }
        XCTAssertEqual(seen, [d])
    }

    func testSizeIsPartOfIdentity() throws {
        let s = try DiskStorage(root: tempDir())
        let (d, data) = blob("foo")
        try s.commitWrite(d, DataSource(data))
        let wrongSize = try Digest(hash: d.hash, size: 999)
        XCTAssertFalse(try s.hasBlob(wrongSize))
        XCTAssertNil(try s.getBlob(wrongSize))
        try s.deleteBlob(wrongSize)
        XCTAssertTrue(try s.hasBlob(d), "deleting another size must not remove this blob")
    }

    func testTruncatedObjectIsReplacedOnCommit() throws {
        let s = try DiskStorage(root: tempDir())
        let (d, data) = blob("complete content")
        try FileManager.default.createDirectory(atPath: (s.objectPath(d) as NSString).deletingLastPathComponent,
                                                withIntermediateDirectories: true)
        try Data("compl".utf8).write(to: URL(fileURLWithPath: s.objectPath(d)))
        XCTAssertFalse(try s.hasBlob(d))
        XCTAssertNil(try s.getBlob(d))
        try s.commitWrite(d, DataSource(data))
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
    }

    func testExistingObjectIsSuccess() throws {
        let s = try DiskStorage(root: tempDir())
        let (d, data) = blob("twice")
        try s.commitWrite(d, DataSource(data))
        try s.commitWrite(d, DataSource(data))
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
    }

    func testConcurrentCommitsOfOneBlob() throws {
        let s = try DiskStorage(root: tempDir())
        let (d, data) = blob(String(repeating: "concurrent", count: 1000))
        DispatchQueue.concurrentPerform(iterations: 16) { _ in
            do { try s.commitWrite(d, DataSource(data)) } catch { XCTFail("\(error)") }
        }
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
    }

    func testCommitFromFileSource() throws {
        let root = tempDir()
        let s = try DiskStorage(root: root)
        var bytes = [UInt8](repeating: 0, count: 3 << 20)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i * 7) }
        let data = Data(bytes)
        let staging = root + "/staging"
        try data.write(to: URL(fileURLWithPath: staging))
        let d = Digest.of(data)
        try s.commitWrite(d, try FileSource(path: staging))
        XCTAssertEqual(try s.getBlob(d)?.computeDigest(), d)
        XCTAssertEqual(try s.read(d, offset: 1 << 20, length: 16), data.subdata(in: (1 << 20)..<((1 << 20) + 16)))
    }

    func testDelete() throws {
        let s = try DiskStorage(root: tempDir())
        let (d, data) = blob("bye")
        try s.commitWrite(d, DataSource(data))
        let open = try XCTUnwrap(s.openBlob(d))
        try s.deleteBlob(d)
        XCTAssertFalse(try s.hasBlob(d))
        XCTAssertNil(try s.read(d, offset: 0, length: 3))
        XCTAssertEqual(try open.readAll(), data, "an open handle stays readable after the delete")
        try s.deleteBlob(d) // absent: fine
    }

    func testWithdrawRestoreAndDiscard() throws {
        let s = try DiskStorage(root: tempDir())
        let (d, data) = blob("withdrawn")
        try s.commitWrite(d, DataSource(data))
        let w = try XCTUnwrap(s.withdraw(d))
        XCTAssertFalse(try s.hasBlob(d), "out of sight once withdrawn")
        XCTAssertTrue(s.restore(w))
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
        let w2 = try XCTUnwrap(s.withdraw(d))
        // Stored again meanwhile: restoring keeps the new copy.
        try s.commitWrite(d, DataSource(data))
        XCTAssertTrue(s.restore(w2))
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
        let w3 = try XCTUnwrap(s.withdraw(d))
        s.discard(w3)
        XCTAssertFalse(try s.hasBlob(d))
        XCTAssertNil(try s.withdraw(d))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.root + "/tmp"), [])
    }

    func testStaleTemporariesAreRemovedAtStart() throws {
        let root = tempDir()
        _ = try DiskStorage(root: root)
        let stale = root + "/tmp/abandoned.XXXXXX"
        let fresh = root + "/tmp/in-progress.XXXXXX"
        try Data(count: 1000).write(to: URL(fileURLWithPath: stale))
        try Data(count: 1000).write(to: URL(fileURLWithPath: fresh))
        let old = Date().addingTimeInterval(-2 * DiskStorage.staleTemporaryAge)
        try FileManager.default.setAttributes([.modificationDate: old], ofItemAtPath: stale)
        _ = try DiskStorage(root: root)
        XCTAssertFalse(FileManager.default.fileExists(atPath: stale))
        XCTAssertTrue(FileManager.default.fileExists(atPath: fresh), "a live write's temporary is left alone")
    }

    func testRewriteReplacesAnObjectWithoutProof() throws {
        let s = try DiskStorage(root: tempDir())
        let (d, data) = blob("replace me")
        let p = s.objectPath(d)
        try FileManager.default.createDirectory(atPath: (p as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try Data("replace mE".utf8).write(to: URL(fileURLWithPath: p))  // same length, wrong bytes, no proof
        XCTAssertFalse(try s.skipsWrite(d, DataSource(data)))
        try s.commitWrite(d, DataSource(data))
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
        XCTAssertTrue(try XCTUnwrap(s.openBlob(d)).isVerified)
        XCTAssertTrue(try s.skipsWrite(d, DataSource(data)))
    }

    func testStorageFullIsAClearError() throws {
        // A tiny tmpfs makes ENOSPC real.
        let root = tempDir()
        guard mountTmpfs(root, size: "64k") else {
            return XCTFail("cannot mount a tmpfs to simulate a full disk (need root)")
        }
        defer { _ = umount2(root, Int32(MNT_DETACH)) }
        let s = try DiskStorage(root: root)
        let big = Data(repeating: 7, count: 256 * 1024)
        let d = Digest.of(big)
        XCTAssertThrowsError(try s.commitWrite(d, DataSource(big))) { e in
            guard case StorageError.storageFull(let msg) = e else { return XCTFail("\(e)") }
            XCTAssertTrue(msg.contains("No space"), msg)
            XCTAssertEqual((e as? StorageError)?.errno, ENOSPC)
        }
        XCTAssertFalse(try s.hasBlob(d))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root + "/tmp"), [], "temporary removed")
    }

    func testUnwritableRootIsAnError() {
        XCTAssertThrowsError(try DiskStorage(root: "/proc/casfs-cannot-exist"))
    }
}

func mountTmpfs(_ path: String, size: String) -> Bool {
    mount("tmpfs", path, "tmpfs", 0, "size=\(size)") == 0
}
