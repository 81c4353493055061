import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

/// Whatever stands at an object path, a write stores the blob's bytes or
/// fails; a copy withdrawn by a deletion that may be undone is not taken
/// for a leftover.
final class DiskStoreForeignObjectTests: XCTestCase {
    /// A symbolic link, a directory (empty or not) and a FIFO planted at a
    /// blob's object path: a write of the blob stores its bytes in their
    /// place, readable and proven, and the write says so by returning the
    /// copy it put there.
    func testWriteOverAForeignObjectStoresTheBytes() throws {
        let root = tempDir()
        let s = try DiskStorage(root: root)
        let elsewhere = root + "/elsewhere"
        try Data("not this blob".utf8).write(to: URL(fileURLWithPath: elsewhere))
        let plants: [(String, (String) throws -> Void)] = [
            ("a symbolic link", { p in XCTAssertEqual(symlink(elsewhere, p), 0) }),
            ("a dangling symbolic link", { p in XCTAssertEqual(symlink(root + "/nothing", p), 0) }),
            ("an empty directory", { p in XCTAssertEqual(mkdir(p, 0o755), 0) }),
            ("a directory with a file", { p in
                XCTAssertEqual(mkdir(p, 0o755), 0)
                try Data("inside".utf8).write(to: URL(fileURLWithPath: p + "/f"))
            }),
            ("a FIFO", { p in XCTAssertEqual(mkfifo(p, 0o644), 0) }),
        ]
        for (i, (what, plant)) in plants.enumerated() {
            let (d, data) = blob("planted over: \(what) \(i)")
            let p = s.objectPath(d)
            try FileManager.default.createDirectory(atPath: (p as NSString).deletingLastPathComponent,
                                                    withIntermediateDirectories: true)
            try plant(p)
            XCTAssertFalse(try s.hasBlob(d), what)
            XCTAssertNil(try s.getBlob(d), what)
            let copy = try s.commitTracked(d, DataSource(data, verified: true))
            XCTAssertNotNil(copy, "\(what): the write claims another writer's copy")
            var st = stat()
            XCTAssertEqual(lstat(p, &st), 0, what)
            XCTAssertEqual(st.st_mode & S_IFMT, S_IFREG, "\(what) is still there")
            XCTAssertTrue(try s.hasBlob(d), what)
            let got = try XCTUnwrap(s.openBlob(d), what)
            XCTAssertEqual(try got.readAll(), data, what)
            XCTAssertTrue(got.isVerified, "\(what): the stored copy has no proof")
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: p)), data, what)
            // A second write finds the copy.
            XCTAssertNil(try s.commitTracked(d, DataSource(data, verified: true)), what)
        }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: elsewhere)), Data("not this blob".utf8),
                       "the symbolic link's target was written to")
    }

    /// A copy withdrawn by a deletion that may still be undone keeps its
    /// object's mtime; another store opened on the same root (a command, a
    /// second mount) leaves it alone, and it can be restored.
    func testWithdrawnCopyWithAnOldMtimeSurvivesAnotherStoreOpening() throws {
        let root = tempDir()
        let s = try DiskStorage(root: root)
        let (d, data) = blob("withdrawn, then restored")
        try s.commitWrite(d, DataSource(data, verified: true))
        let old = Date().addingTimeInterval(-10 * DiskStorage.staleTemporaryAge)
        try FileManager.default.setAttributes([.modificationDate: old], ofItemAtPath: s.objectPath(d))
        let w = try XCTUnwrap(s.withdraw(d))
        _ = try DiskStorage(root: root)
        XCTAssertEqual(s.removeStaleTemporaries(), 0, "an in-flight withdrawn copy was taken for a leftover")
        XCTAssertTrue(s.restore(w))
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
    }
}
