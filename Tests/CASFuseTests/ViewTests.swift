import CASCore
import CASFuse
import CASStorage
import Foundation
import FuseKernel
import FuseTestHarness
import Glibc
import XCTest

/// The `/sha256` and root views of CASFileSystem driven by encoded requests
/// over the harness: no kernel, a real disk store.
final class ViewTests: XCTestCase {
    var dir = ""
    var disk: DiskStorage!
    var h: FuseHarness!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "casfs-views-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir + "/staging", withIntermediateDirectories: true)
        disk = try DiskStorage(root: dir + "/store")
        let storage = WriteCheckingStorage(EmptyBlobStorage(disk))
        var options = MountOptions()
        options.writable = true
        let fs = CASFileSystem(storage: storage, index: nil, options: options, stagingDirectory: dir + "/staging",
                               recordAccess: nil)
        h = try FuseHarness(fs, threads: 2)
        XCTAssertEqual(h.initialize()?.error, 0)
    }

    override func tearDown() {
        h?.close()
        h = nil
        try? FileManager.default.removeItem(atPath: dir)
    }

    func lookup(_ parent: UInt64, _ name: String) throws -> EntryOut {
        try XCTUnwrap(h.lookup(parent, name)).entry()
    }

    func testLookupsAndAttributes() throws {
        let (d, data) = (Digest.of(Data("hello".utf8)), Data("hello".utf8))
        try disk.commitWrite(d, DataSource(data))
        XCTAssertEqual(try lookup(FuseABI.rootID, "sha256").nodeid, 2)
        let hit = try lookup(2, d.description)
        XCTAssertEqual(hit.attr.size, 5)
        XCTAssertTrue(hit.attr.isRegular)
        // Absent and malformed names: negative entries (nodeid 0), not errors.
        XCTAssertTrue(try lookup(2, Digest.of(Data("x".utf8)).description).isNegative)
        XCTAssertTrue(try lookup(2, "not-a-digest").isNegative)
        // GETATTR of the blob: 0444, its size, blocks rounded up.
        let a = try XCTUnwrap(h.getattr(hit.nodeid)).attributes().attr
        XCTAssertEqual(a.size, 5)
        XCTAssertEqual(a.blocks, 1)
        XCTAssertEqual(a.permissions, 0o444)
        XCTAssertEqual(h.getattr(12345)?.error, ENOENT)
        // A blob is not a directory.
        XCTAssertEqual(h.lookup(hit.nodeid, "x")?.error, ENOTDIR)
        XCTAssertEqual(h.readdir(hit.nodeid)?.error, ENOTDIR)
        XCTAssertEqual(h.readlink(hit.nodeid)?.error, EINVAL)
        // Directories cannot be opened as files.
        XCTAssertEqual(h.open(2)?.error, EISDIR)
    }

    func testHugeSizesNeitherTrapNorLie() throws {
        let hash = Digest.of(Data("big".utf8)).hash
        // A name claiming 2^63-1 bytes: creatable (it is a valid name), never storable.
        let (entry, open) = try XCTUnwrap(h.create(2, "\(hash)_9223372036854775807")).created()
        let ino = entry.nodeid
        let fh = open.fh
        // A write at an offset past Int64 is refused, not a trap.
        XCTAssertEqual(h.write(ino, fh: fh, offset: UInt64.max - 2, [1, 2, 3])?.error, EINVAL)
        XCTAssertEqual(h.write(ino, fh: fh, offset: UInt64(Int64.max), [1, 2, 3])?.error, EFBIG)
        // A read at an offset past Int64: EINVAL.
        XCTAssertEqual(h.read(ino, fh: fh, offset: UInt64.max, size: 10)?.error, EINVAL)
        // Closing: incomplete, nobody else holds it (this process does not
        // have it open as far as /proc says): EIO, nothing stored.
        XCTAssertEqual(h.flush(ino, fh: fh)?.error, EIO)
        XCTAssertEqual(h.release(ino, fh: fh)?.error, 0)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir + "/store/cas/objects").count, 0)
        // A name with a size that does not fit: not even a name.
        XCTAssertEqual(h.create(2, "\(hash)_9223372036854775808")?.error, EINVAL)
    }

    func testCreateWriteFlushStoresOnlyTheRightBytes() throws {
        let data = Array("the content".utf8)
        let d = Digest.of(Data(data))
        let (entry, open) = try XCTUnwrap(h.create(2, d.description, flags: O_WRONLY | O_CREAT | O_TRUNC)).created()
        let ino = entry.nodeid
        XCTAssertEqual(entry.attr.size, 0, "a name being written shows what is written so far")
        XCTAssertEqual(entry.entryTimeout, 0, "whether the name exists is decided at close")
        let fh = open.fh
        XCTAssertTrue(open.flags.contains(.directIO))
        XCTAssertEqual(try XCTUnwrap(h.write(ino, fh: fh, offset: 0, Array(data[0..<4]))).written(), 4)
        XCTAssertEqual(h.write(ino, fh: fh, offset: 4, Array(data[4...]))?.error, 0)
        // Its size so far, uncached.
        let (attr, timeout) = try XCTUnwrap(h.getattr(ino, fh: fh)).attributes()
        XCTAssertEqual(attr.size, UInt64(data.count))
        XCTAssertEqual(timeout, 0)
        // Past the size in the name: EFBIG.
        XCTAssertEqual(h.write(ino, fh: fh, offset: UInt64(data.count), [1])?.error, EFBIG)
        XCTAssertEqual(h.flush(ino, fh: fh)?.error, 0)
        XCTAssertEqual(h.release(ino, fh: fh)?.error, 0)
        XCTAssertEqual(try disk.getBlob(d)?.readAll(), Data(data))
        XCTAssertTrue(try XCTUnwrap(disk.openBlob(d)).isVerified, "written through casfs: carries its proof")

        // Wrong bytes under a name: EIO at the close, nothing stored.
        var wrong = data
        wrong[0] ^= 1
        let other = try Digest(hash: Digest.of(Data("other content".utf8)).hash, size: Int64(wrong.count))
        let bad = try XCTUnwrap(h.create(2, other.description)).created()
        XCTAssertEqual(h.write(bad.entry.nodeid, fh: bad.open.fh, offset: 0, wrong)?.error, 0)
        XCTAssertEqual(h.flush(bad.entry.nodeid, fh: bad.open.fh)?.error, EIO)
        XCTAssertEqual(h.release(bad.entry.nodeid, fh: bad.open.fh)?.error, 0)
        XCTAssertFalse(try disk.hasBlob(other))
    }

    func testRewriteOfAnExistingBlobNeedsTheOpensOwnTruncate() throws {
        let data = Data("immutable".utf8)
        let d = Digest.of(data)
        try disk.commitWrite(d, DataSource(data))
        let ino = try lookup(2, d.description).nodeid
        // Open for writing (O_TRUNC is not sent in OPEN: it comes as a SETATTR).
        let fh = try XCTUnwrap(h.open(ino, flags: O_WRONLY)).open().fh
        // Writing in place: EPERM.
        XCTAssertEqual(h.write(ino, fh: fh, offset: 0, [1])?.error, EPERM)
        // ftruncate (with the handle): EPERM.
        XCTAssertEqual(h.setattr(ino, valid: [.size, .fh], fh: fh)?.error, EPERM)
        // The open's O_TRUNC: no handle, from the opening thread. Accepted;
        // the size readers see stays the blob's.
        let t = try XCTUnwrap(h.setattr(ino, valid: [.size, .mtime, .ctime])).attributes()
        XCTAssertEqual(t.attr.size, UInt64(data.count), "readers keep the blob's size")
        // The same bytes: a no-op that succeeds.
        XCTAssertEqual(h.write(ino, fh: fh, offset: 0, Array(data))?.error, 0)
        XCTAssertEqual(h.flush(ino, fh: fh)?.error, 0)
        XCTAssertEqual(h.release(ino, fh: fh)?.error, 0)
        // truncate(2) of the committed blob, by another thread: EPERM.
        XCTAssertEqual(h.setattr(ino, valid: [.size, .mtime, .ctime], pid: 1)?.error, EPERM)
        // chmod: EPERM (immutable).
        XCTAssertEqual(h.setattr(ino, valid: [.mode])?.error, EPERM)
        XCTAssertEqual(try disk.getBlob(d)?.readAll(), data)
    }

    func testReadsUnlinkAndOpenAfterDelete() throws {
        let data = Data((0..<100_000).map { UInt8(truncatingIfNeeded: $0) })
        let d = Digest.of(data)
        try disk.commitWrite(d, DataSource(data))
        let ino = try lookup(2, d.description).nodeid
        let open = try XCTUnwrap(h.open(ino)).open()
        XCTAssertTrue(open.flags.contains(.keepCache))
        let fh = open.fh
        XCTAssertEqual(h.read(ino, fh: fh, offset: 0, size: 4096)?.payload, Array(data[0..<4096]))
        // Delete it: the open handle still reads every byte.
        XCTAssertEqual(h.unlink(2, d.description)?.error, 0)
        XCTAssertFalse(try disk.hasBlob(d))
        XCTAssertEqual(h.read(ino, fh: fh, offset: 4096, size: 200_000)?.payload, Array(data[4096...]))
        // Past the end: empty.
        XCTAssertEqual(h.read(ino, fh: fh, offset: 200_000, size: 10)?.payload, [])
        XCTAssertEqual(h.release(ino, fh: fh)?.error, 0)
        // A new open: ENOENT (it was reached through /sha256), and the kernel's entry is dropped.
        XCTAssertEqual(h.open(ino)?.error, ENOENT)
        XCTAssertTrue(try lookup(2, d.description).isNegative, "the name is gone")
        XCTAssertEqual(h.unlink(2, d.description)?.error, ENOENT)
    }

    func testXattrsStatfsAndListing() throws {
        let data = Data("xattr".utf8)
        let d = Digest.of(data)
        try disk.commitWrite(d, DataSource(data))
        let ino = try lookup(2, d.description).nodeid
        XCTAssertEqual(try XCTUnwrap(h.getxattr(ino, "user.casfs.digest", size: 0)).xattrSize(), d.description.utf8.count)
        XCTAssertEqual(h.getxattr(ino, "user.casfs.digest", size: 10)?.error, ERANGE)
        XCTAssertEqual(h.getxattr(ino, "user.casfs.digest", size: 200)?.payload, Array(d.description.utf8))
        XCTAssertEqual(h.getxattr(ino, "user.checksum.sha256", size: 32)?.payload, d.rawHash)
        XCTAssertEqual(h.getxattr(ino, "user.other", size: 100)?.error, ENODATA)
        XCTAssertEqual(h.listxattr(ino, size: 1000)?.names, ["user.checksum.sha256", "user.casfs.digest"])
        XCTAssertEqual(h.listxattr(1, size: 1000)?.names, ["user.casfs.stats"])
        XCTAssertEqual(h.getxattr(99999, "user.casfs.digest", size: 100)?.error, ENOENT)
        let statfs = try XCTUnwrap(h.statfs()).statfs()
        XCTAssertGreaterThan(statfs.filesFree, 0, "free files: df -i is not 100% used")
        // The root lists sha256 and tree, with and without a handle, plain and plus.
        let fh = try XCTUnwrap(h.opendir(1)).open().fh
        XCTAssertEqual(try h.listAll(1, fh: fh).map(\.name), [".", "..", "sha256", "tree"])
        let plus = try h.listAllPlus(1)
        XCTAssertEqual(plus.map(\.name), [".", "..", "sha256", "tree"])
        XCTAssertEqual(plus[2].entry.nodeid, 2)
        XCTAssertTrue(plus[3].entry.attr.isDirectory)
        XCTAssertEqual(try h.listAll(3).map(\.name), [".", ".."], "/tree lists nothing")
        // Changes the tree never allows.
        XCTAssertEqual(h.mkdir(2, "d")?.error, EPERM)
        XCTAssertEqual(h.unlink(2, Digest.empty.description)?.error, EPERM)
        XCTAssertEqual(h.create(1, "x")?.error, EPERM)
        XCTAssertEqual(h.create(ino, "x")?.error, ENOTDIR)
    }

    func testForgedListingOffsetsEndTheListing() throws {
        try disk.commitWrite(Digest.of(Data("listed".utf8)), DataSource(Data("listed".utf8)))
        for dir: UInt64 in [1, 2, 3] {
            let fh = try XCTUnwrap(h.opendir(dir)).open().fh
            for offset in [UInt64.max, UInt64(1) << 63, UInt64.max - 1] {
                let r = try XCTUnwrap(h.readdir(dir, fh: fh, offset: offset), "no answer to READDIR at \(offset)")
                XCTAssertEqual(try r.dirents().count, 0, "a listing past every entry is empty")
            }
        }
        XCTAssertNoThrow(try XCTUnwrap(h.statfs()).statfs(), "still serving")
    }

    func testForgetDropsNodesAndUnknownInodesAreENOENT() throws {
        let data = Data("forget me".utf8)
        let d = Digest.of(data)
        try disk.commitWrite(d, DataSource(data))
        let ino = try lookup(2, d.description).nodeid
        XCTAssertEqual(try lookup(2, d.description).nodeid, ino, "the same inode at every lookup")
        h.forget(ino, 1)
        XCTAssertEqual(h.getattr(ino)?.error, 0, "one lookup left")
        h.forget(ino, 1)
        XCTAssertEqual(h.getattr(ino)?.error, ENOENT, "forgotten")
        XCTAssertEqual(h.open(ino)?.error, ENOENT)
        XCTAssertEqual(h.read(ino, offset: 0, size: 10)?.error, ENOENT)
        // The fixed directories are never forgotten.
        h.forget(2, 100)
        XCTAssertEqual(h.getattr(2)?.error, 0)
    }
}
