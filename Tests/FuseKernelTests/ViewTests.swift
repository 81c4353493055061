import CASCore
import CASFuse
import CASStorage
import Foundation
import FuseKernel
import Glibc
import XCTest

/// The views of CASFileSystem driven by encoded requests over the harness:
/// no kernel, a real disk store.
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

    typealias L = FuseHarness

    func lookup(_ parent: UInt64, _ name: String) -> (error: Int32, ino: UInt64, size: UInt64) {
        guard let r = h.send(.lookup, parent, L.cstr(name)) else { return (-1, 0, 0) }
        guard r.error == 0 else { return (r.error, 0, 0) }
        let f = Fields(b: r.payload)
        return (0, f.u64(0), f.u64(48))
    }

    func openBody(_ flags: Int32) -> [UInt8] { L.le(UInt32(bitPattern: flags)) + L.le(UInt32(0)) }
    func readBody(fh: UInt64, offset: UInt64, size: UInt32) -> [UInt8] {
        L.le(fh) + L.le(offset) + L.le(size) + L.le(UInt32(0)) + L.le(UInt64(0)) + L.le(UInt32(0)) + L.le(UInt32(0))
    }
    func writeBody(fh: UInt64, offset: UInt64, _ data: [UInt8]) -> [UInt8] {
        L.le(fh) + L.le(offset) + L.le(UInt32(data.count)) + L.le(UInt32(0)) + L.le(UInt64(0)) + L.le(UInt32(0)) + L.le(UInt32(0)) + data
    }
    func fhBody(_ fh: UInt64) -> [UInt8] { L.le(fh) + L.le(UInt32(0)) + L.le(UInt32(0)) + L.le(UInt64(0)) }

    func testLookupsAndAttributes() throws {
        let (d, data) = (Digest.of(Data("hello".utf8)), Data("hello".utf8))
        try disk.commitWrite(d, DataSource(data))
        XCTAssertEqual(lookup(FuseABI.rootID, "sha256").ino, 2)
        let hit = lookup(2, d.description)
        XCTAssertEqual(hit.error, 0)
        XCTAssertEqual(hit.size, 5)
        // Absent and malformed names: negative entries (nodeid 0), not errors.
        let absent = try XCTUnwrap(h.send(.lookup, 2, L.cstr(Digest.of(Data("x".utf8)).description)))
        XCTAssertEqual(absent.error, 0)
        XCTAssertEqual(Fields(b: absent.payload).u64(0), 0)
        XCTAssertEqual(Fields(b: try XCTUnwrap(h.send(.lookup, 2, L.cstr("not-a-digest"))).payload).u64(0), 0)
        // GETATTR of the blob: 0444, its size, blocks rounded up.
        let attr = try XCTUnwrap(h.send(.getattr, hit.ino, L.le(UInt32(0)) + L.le(UInt32(0)) + L.le(UInt64(0))))
        let a = Fields(b: attr.payload)
        XCTAssertEqual(a.u64(16 + 8), 5)
        XCTAssertEqual(a.u64(16 + 16), 1, "blocks")
        XCTAssertEqual(a.u32(16 + 60) & 0o7777, 0o444)
        XCTAssertEqual(h.send(.getattr, 12345, L.le(UInt64(0)) + L.le(UInt64(0)))?.error, ENOENT)
    }

    func testHugeSizesNeitherTrapNorLie() throws {
        let hash = Digest.of(Data("big".utf8)).hash
        // A name claiming 2^63-1 bytes: creatable (it is a valid name), never storable.
        let create = try XCTUnwrap(h.send(.create, 2, L.le(UInt32(O_WRONLY | O_CREAT)) + L.le(UInt32(0o644)) + L.le(UInt64(0))
                                          + L.cstr("\(hash)_9223372036854775807")))
        XCTAssertEqual(create.error, 0)
        let ino = Fields(b: create.payload).u64(0)
        let fh = Fields(b: create.payload).u64(128)
        // A write at an offset past Int64 is refused, not a trap.
        XCTAssertEqual(h.send(.write, ino, writeBody(fh: fh, offset: UInt64.max - 2, [1, 2, 3]))?.error, EINVAL)
        XCTAssertEqual(h.send(.write, ino, writeBody(fh: fh, offset: UInt64(Int64.max), [1, 2, 3]))?.error, EFBIG)
        // A read at an offset past Int64: EINVAL.
        XCTAssertEqual(h.send(.read, ino, readBody(fh: fh, offset: UInt64.max, size: 10))?.error, EINVAL)
        // Closing: incomplete, nobody else holds it (this process does not
        // have it open as far as /proc says): EIO, nothing stored.
        XCTAssertEqual(h.send(.flush, ino, fhBody(fh))?.error, EIO)
        XCTAssertEqual(h.send(.release, ino, fhBody(fh))?.error, 0)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir + "/store/cas/objects").count, 0)
        // A name with a size that does not fit: not even a name.
        XCTAssertEqual(h.send(.create, 2, L.le(UInt32(O_WRONLY | O_CREAT)) + L.le(UInt32(0o644)) + L.le(UInt64(0))
                              + L.cstr("\(hash)_9223372036854775808"))?.error, EINVAL)
    }

    func testCreateWriteFlushStoresOnlyTheRightBytes() throws {
        let data = Array("the content".utf8)
        let d = Digest.of(Data(data))
        let create = try XCTUnwrap(h.send(.create, 2, L.le(UInt32(O_WRONLY | O_CREAT | O_TRUNC)) + L.le(UInt32(0o644)) + L.le(UInt64(0)) + L.cstr(d.description)))
        XCTAssertEqual(create.error, 0)
        let f = Fields(b: create.payload)
        let ino = f.u64(0)
        XCTAssertEqual(f.u64(40 + 8), 0, "a name being written shows what is written so far")
        let fh = f.u64(128)
        XCTAssertEqual(FuseOpenFlags(rawValue: f.u32(136)).contains(.directIO), true)
        XCTAssertEqual(h.send(.write, ino, writeBody(fh: fh, offset: 0, Array(data[0..<4])))?.error, 0)
        XCTAssertEqual(h.send(.write, ino, writeBody(fh: fh, offset: 4, Array(data[4...])))?.error, 0)
        // Past the size in the name: EFBIG.
        XCTAssertEqual(h.send(.write, ino, writeBody(fh: fh, offset: UInt64(data.count), [1]))?.error, EFBIG)
        XCTAssertEqual(h.send(.flush, ino, fhBody(fh))?.error, 0)
        XCTAssertEqual(h.send(.release, ino, fhBody(fh))?.error, 0)
        XCTAssertEqual(try disk.getBlob(d)?.readAll(), Data(data))
        XCTAssertTrue(try XCTUnwrap(disk.openBlob(d)).isVerified, "written through casfs: carries its proof")

        // Wrong bytes under a name: EIO at the close, nothing stored.
        var wrong = data
        wrong[0] ^= 1
        let other = Digest.of(Data("other content".utf8))
        let bad = try XCTUnwrap(h.send(.create, 2, L.le(UInt32(O_WRONLY | O_CREAT)) + L.le(UInt32(0o644)) + L.le(UInt64(0))
                                       + L.cstr(try Digest(hash: other.hash, size: Int64(wrong.count)).description)))
        let bf = Fields(b: bad.payload)
        XCTAssertEqual(h.send(.write, bf.u64(0), writeBody(fh: bf.u64(128), offset: 0, wrong))?.error, 0)
        XCTAssertEqual(h.send(.flush, bf.u64(0), fhBody(bf.u64(128)))?.error, EIO)
        XCTAssertEqual(h.send(.release, bf.u64(0), fhBody(bf.u64(128)))?.error, 0)
        XCTAssertFalse(try disk.hasBlob(try Digest(hash: other.hash, size: Int64(wrong.count))))
    }

    func testRewriteOfAnExistingBlobNeedsTheOpensOwnTruncate() throws {
        let data = Data("immutable".utf8)
        let d = Digest.of(data)
        try disk.commitWrite(d, DataSource(data))
        let ino = lookup(2, d.description).ino
        // Open for writing (O_TRUNC is not sent in OPEN: it comes as a SETATTR).
        let open = try XCTUnwrap(h.send(.open, ino, openBody(O_WRONLY)))
        let fh = Fields(b: open.payload).u64(0)
        // Writing in place: EPERM.
        XCTAssertEqual(h.send(.write, ino, writeBody(fh: fh, offset: 0, [1]))?.error, EPERM)
        // ftruncate (with the handle): EPERM.
        let sizeValid = FuseSetattrValid([.size, .fh]).rawValue
        var setattr = L.le(sizeValid) + L.le(UInt32(0)) + L.le(fh) + L.le(UInt64(0))
        setattr += [UInt8](repeating: 0, count: 88 - setattr.count)
        XCTAssertEqual(h.send(.setattr, ino, setattr)?.error, EPERM)
        // The open's O_TRUNC: no handle, from the opening thread. Accepted;
        // the size readers see stays the blob's.
        var trunc = L.le(FuseSetattrValid([.size, .mtime, .ctime]).rawValue) + L.le(UInt32(0)) + L.le(UInt64(0)) + L.le(UInt64(0))
        trunc += [UInt8](repeating: 0, count: 88 - trunc.count)
        let t = try XCTUnwrap(h.send(.setattr, ino, trunc))
        XCTAssertEqual(t.error, 0)
        XCTAssertEqual(Fields(b: t.payload).u64(16 + 8), UInt64(data.count), "readers keep the blob's size")
        // The same bytes: a no-op that succeeds.
        XCTAssertEqual(h.send(.write, ino, writeBody(fh: fh, offset: 0, Array(data)))?.error, 0)
        XCTAssertEqual(h.send(.flush, ino, fhBody(fh))?.error, 0)
        XCTAssertEqual(h.send(.release, ino, fhBody(fh))?.error, 0)
        // truncate(2) of the committed blob, by another thread: EPERM.
        XCTAssertEqual(h.send(.setattr, ino, trunc, pid: 1)?.error, EPERM)
        XCTAssertEqual(try disk.getBlob(d)?.readAll(), data)
    }

    func testReadsUnlinkAndOpenAfterDelete() throws {
        let data = Data((0..<100_000).map { UInt8(truncatingIfNeeded: $0) })
        let d = Digest.of(data)
        try disk.commitWrite(d, DataSource(data))
        let ino = lookup(2, d.description).ino
        let open = try XCTUnwrap(h.send(.open, ino, openBody(O_RDONLY)))
        XCTAssertEqual(open.error, 0)
        let fh = Fields(b: open.payload).u64(0)
        let first = try XCTUnwrap(h.send(.read, ino, readBody(fh: fh, offset: 0, size: 4096)))
        XCTAssertEqual(first.payload, Array(data[0..<4096]))
        // Delete it: the open handle still reads every byte.
        XCTAssertEqual(h.send(.unlink, 2, L.cstr(d.description))?.error, 0)
        XCTAssertFalse(try disk.hasBlob(d))
        let rest = try XCTUnwrap(h.send(.read, ino, readBody(fh: fh, offset: 4096, size: 200_000)))
        XCTAssertEqual(rest.payload, Array(data[4096...]))
        // Past the end: empty.
        XCTAssertEqual(h.send(.read, ino, readBody(fh: fh, offset: 200_000, size: 10))?.payload, [])
        XCTAssertEqual(h.send(.release, ino, fhBody(fh))?.error, 0)
        // A new open: ENOENT.
        XCTAssertEqual(h.send(.open, ino, openBody(O_RDONLY))?.error, ENOENT)
        XCTAssertEqual(lookup(2, d.description).ino, 0, "the name is gone")
    }

    func testXattrsStatfsAndListing() throws {
        let data = Data("xattr".utf8)
        let d = Digest.of(data)
        try disk.commitWrite(d, DataSource(data))
        let ino = lookup(2, d.description).ino
        func getx(_ name: String, _ size: UInt32) -> (error: Int32, payload: [UInt8])? {
            h.send(.getxattr, ino, L.le(size) + L.le(UInt32(0)) + L.cstr(name))
        }
        XCTAssertEqual(Fields(b: try XCTUnwrap(getx("user.casfs.digest", 0)).payload).u32(0), UInt32(d.description.utf8.count))
        XCTAssertEqual(getx("user.casfs.digest", 10)?.error, ERANGE)
        XCTAssertEqual(getx("user.casfs.digest", 200)?.payload, Array(d.description.utf8))
        XCTAssertEqual(getx("user.checksum.sha256", 32)?.payload, d.rawHash)
        XCTAssertEqual(getx("user.other", 100)?.error, ENODATA)
        let statfs = try XCTUnwrap(h.send(.statfs, 1))
        XCTAssertEqual(statfs.payload.count, FuseABI.statfsOutSize)
        XCTAssertGreaterThan(Fields(b: statfs.payload).u64(32), 0, "free files: df -i is not 100% used")
        // The root lists sha256 and tree.
        let body = L.le(UInt64(0)) + L.le(UInt64(0)) + L.le(UInt32(4096)) + [UInt8](repeating: 0, count: 20)
        let open = try XCTUnwrap(h.send(.opendir, 1, openBody(O_RDONLY)))
        let listing = try XCTUnwrap(h.send(.readdir, 1, L.le(Fields(b: open.payload).u64(0)) + body.dropFirst(8)))
        let text = String(decoding: listing.payload, as: UTF8.self)
        XCTAssertTrue(text.contains("sha256") && text.contains("tree"))
        // Changes the tree never allows.
        XCTAssertEqual(h.send(.mkdir, 2, L.le(UInt32(0o755)) + L.le(UInt32(0)) + L.cstr("d"))?.error, EPERM)
        XCTAssertEqual(h.send(.unlink, 2, L.cstr(Digest.empty.description))?.error, EPERM)
    }

    func testForgedListingOffsetsEndTheListing() throws {
        try disk.commitWrite(Digest.of(Data("listed".utf8)), DataSource(Data("listed".utf8)))
        for dir: UInt64 in [1, 2] {
            let open = try XCTUnwrap(h.send(.opendir, dir, openBody(O_RDONLY)))
            let fh = Fields(b: open.payload).u64(0)
            for offset in [UInt64.max, UInt64(1) << 63, UInt64.max - 1] {
                let body = L.le(fh) + L.le(offset) + L.le(UInt32(4096)) + [UInt8](repeating: 0, count: 20)
                let r = try XCTUnwrap(h.send(.readdir, dir, body), "no answer to READDIR at \(offset)")
                XCTAssertEqual(r.error, 0)
                XCTAssertEqual(r.payload.count, 0, "a listing past every entry is empty")
            }
        }
        XCTAssertEqual(try XCTUnwrap(h.send(.statfs, 1)).payload.count, FuseABI.statfsOutSize, "still serving")
    }
}
