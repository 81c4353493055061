import CASCore
import CASFuse
import CASStorage
import CASTree
import Foundation
import FuseKernel
import FuseTestHarness
import Glibc
import REAPI
import SwiftProtobuf
import XCTest

/// `/tree/<digest>/…` driven through the harness: Directory blobs in a
/// memory store, a read-only (open-less) mount.
final class TreeViewTests: XCTestCase {
    var storage: (any Storage)!
    var fs: CASFileSystem!
    var h: FuseHarness!
    var dir = ""

    let hello = Data("hello\n".utf8)
    let script = Data("#!/bin/sh\necho hi\n".utf8)
    let inner = Data("inner\n".utf8)

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "casfs-treeviews-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        storage = WriteCheckingStorage(EmptyBlobStorage(MemoryStorage(maxBytes: 64 << 20)))
        try mount(MountOptions())
    }

    func mount(_ options: MountOptions) throws {
        h?.close()
        fs = CASFileSystem(storage: storage, index: nil, options: options, stagingDirectory: dir, recordAccess: nil)
        h = try FuseHarness(fs, threads: 2)
        XCTAssertEqual(h.initialize()?.error, 0)
    }

    override func tearDown() {
        h?.close()
        h = nil
        try? FileManager.default.removeItem(atPath: dir)
    }

    @discardableResult
    func put(_ data: Data) throws -> Digest {
        let d = Digest.of(data)
        try storage.commitWrite(d, DataSource(data))
        return d
    }

    func putDirectory(_ m: Build_Bazel_Remote_Execution_V2_Directory) throws -> Digest {
        try put(try m.serializedBytes())
    }

    func pb(_ d: Digest) -> Build_Bazel_Remote_Execution_V2_Digest { .with { $0.hash = d.hash; $0.sizeBytes = d.size } }

    /// root/{a.txt, run.sh (executable), stamped (mtime, mode 0640), sub/inner.txt, link -> a.txt}
    func makeTree() throws -> Digest {
        let sub = try putDirectory(.with {
            $0.files = [.with { $0.name = "inner.txt"; $0.digest = pb(try! put(inner)) }]
            $0.nodeProperties = .with { $0.unixMode = .with { $0.value = 0o750 } }
        })
        return try putDirectory(.with {
            $0.files = [
                .with { $0.name = "a.txt"; $0.digest = pb(try! put(hello)) },
                .with { $0.name = "run.sh"; $0.digest = pb(try! put(script)); $0.isExecutable = true },
                .with {
                    $0.name = "stamped"; $0.digest = pb(try! put(hello))
                    $0.nodeProperties = .with {
                        $0.mtime = .with { $0.seconds = 1_700_000_000; $0.nanos = 5 }
                        $0.unixMode = .with { $0.value = 0o4640 }
                    }
                },
            ]
            $0.directories = [.with { $0.name = "sub"; $0.digest = pb(sub) }]
            $0.symlinks = [.with { $0.name = "link"; $0.target = "a.txt" }]
        })
    }

    func lookup(_ parent: UInt64, _ name: String) throws -> EntryOut {
        try XCTUnwrap(h.lookup(parent, name), "no answer to LOOKUP \(name)").entry()
    }

    func testLookupsGiveEachKindItsAttributes() throws {
        let root = try makeTree()
        let r = try lookup(3, root.description)
        XCTAssertTrue(r.attr.isDirectory)
        XCTAssertEqual(r.attr.permissions, 0o555)
        XCTAssertEqual(r.attr.nlink, 3, "two plus one subdirectory")
        XCTAssertEqual(r.attr.ino, r.nodeid)

        let a = try lookup(r.nodeid, "a.txt")
        XCTAssertTrue(a.attr.isRegular)
        XCTAssertEqual(a.attr.permissions, 0o444)
        XCTAssertEqual(a.attr.size, UInt64(hello.count))
        // A plain file is the blob's own inode: the same as through /sha256.
        XCTAssertEqual(try lookup(2, Digest.of(hello).description).nodeid, a.nodeid)

        let run = try lookup(r.nodeid, "run.sh")
        XCTAssertEqual(run.attr.permissions, 0o555)
        XCTAssertNotEqual(run.nodeid, try lookup(2, Digest.of(script).description).nodeid, "an executable is a variant")

        let stamped = try lookup(r.nodeid, "stamped")
        XCTAssertEqual(stamped.attr.permissions, 0o640, "unix_mode without setuid")
        XCTAssertEqual(stamped.attr.mtime, 1_700_000_000)
        XCTAssertEqual(stamped.attr.mtimensec, 5)
        XCTAssertNotEqual(stamped.nodeid, a.nodeid, "same bytes, other properties: another inode")

        let sub = try lookup(r.nodeid, "sub")
        XCTAssertTrue(sub.attr.isDirectory)
        XCTAssertEqual(sub.attr.permissions, 0o750, "the subdirectory's own node_properties")
        XCTAssertEqual(sub.attr.nlink, 2)
        XCTAssertEqual(try lookup(sub.nodeid, "inner.txt").attr.size, UInt64(inner.count))

        let link = try lookup(r.nodeid, "link")
        XCTAssertTrue(link.attr.isSymlink)
        XCTAssertEqual(link.attr.size, 5)
        XCTAssertEqual(h.readlink(link.nodeid)?.payload, Array("a.txt".utf8))
        XCTAssertEqual(h.readlink(sub.nodeid)?.error, EINVAL)
        XCTAssertEqual(h.lookup(link.nodeid, "x")?.error, ENOTDIR)

        // A name the tree does not have: a negative entry (the tree never changes).
        let absent = try lookup(r.nodeid, "nope")
        XCTAssertTrue(absent.isNegative)
        XCTAssertGreaterThanOrEqual(absent.entryTimeout, 1e8, "never expires")
        // Not a digest, an absent Directory: negative too.
        XCTAssertTrue(try lookup(3, "not-a-digest").isNegative)
        XCTAssertTrue(try lookup(3, Digest.of(Data("no such tree".utf8)).description).isNegative)
    }

    func testAnInvalidDirectoryIsEIOAndLogged() throws {
        let notADirectory = try put(Data("this is text, not a Directory".utf8))
        XCTAssertEqual(h.lookup(3, notADirectory.description)?.error, EIO)
        // Unsorted children.
        let unsorted = try putDirectory(.with {
            $0.files = [.with { $0.name = "b"; $0.digest = pb(.empty) }, .with { $0.name = "a"; $0.digest = pb(.empty) }]
        })
        XCTAssertEqual(h.lookup(3, unsorted.description)?.error, EIO)
        // A subdirectory that is not there: absent (ENOENT as a negative entry).
        let dangling = try putDirectory(.with {
            $0.directories = [.with { $0.name = "gone"; $0.digest = pb(Digest.of(Data("missing".utf8))) }]
        })
        let r = try lookup(3, dangling.description)
        XCTAssertTrue(try lookup(r.nodeid, "gone").isNegative)
    }

    func testListingsPlainAndPlus() throws {
        let root = try makeTree()
        let r = try lookup(3, root.description)
        let names = try h.listAll(r.nodeid).map(\.name)
        XCTAssertEqual(names, [".", "..", "a.txt", "link", "run.sh", "stamped", "sub"])
        let types = Dictionary(uniqueKeysWithValues: try h.listAll(r.nodeid).map { ($0.name, $0.type) })
        XCTAssertEqual(types["sub"], 4)
        XCTAssertEqual(types["link"], 10)
        XCTAssertEqual(types["a.txt"], 8)

        let plus = Dictionary(uniqueKeysWithValues: try h.listAllPlus(r.nodeid).map { ($0.name, $0) })
        XCTAssertEqual(plus["a.txt"]?.entry.nodeid, try lookup(r.nodeid, "a.txt").nodeid, "files come looked up")
        XCTAssertEqual(plus["a.txt"]?.entry.attr.size, UInt64(hello.count))
        XCTAssertEqual(plus["link"]?.entry.attr.isSymlink, true)
        // Subdirectories too: a walk needs no lookups.
        let sub = try XCTUnwrap(plus["sub"])
        XCTAssertEqual(sub.entry.nodeid, try lookup(r.nodeid, "sub").nodeid)
        XCTAssertEqual(sub.entry.attr.permissions, 0o750)
        XCTAssertTrue(sub.entry.attr.isDirectory)
        XCTAssertEqual(plus["."]?.entry.nodeid, 0, "not handed out again")
        XCTAssertEqual(plus[".."]?.dirent.ino, 3)
        // Small replies: the listing resumes from each entry's offset.
        XCTAssertEqual(try h.listAll(r.nodeid, size: 64).map(\.name), names)
        // Listing a file or a symlink: ENOTDIR.
        XCTAssertEqual(h.readdir(try lookup(r.nodeid, "a.txt").nodeid)?.error, ENOTDIR)
    }

    func testFilesReadOpenLessAndRefuseWrites() throws {
        let root = try makeTree()
        let r = try lookup(3, root.description)
        let a = try lookup(r.nodeid, "a.txt")
        // Open-less: OPEN is ENOSYS, READ comes without a handle.
        XCTAssertEqual(h.open(a.nodeid)?.error, ENOSYS)
        XCTAssertEqual(h.read(a.nodeid, offset: 0, size: 4096)?.payload, Array(hello))
        XCTAssertEqual(h.read(a.nodeid, offset: 2, size: 2)?.payload, Array(hello[2..<4]))
        XCTAssertEqual(h.open(a.nodeid, flags: O_WRONLY)?.error, EROFS)
        XCTAssertEqual(h.create(r.nodeid, "new")?.error, EROFS)
        XCTAssertEqual(h.mkdir(r.nodeid, "d")?.error, EROFS)
        XCTAssertEqual(h.setattr(a.nodeid, valid: [.mode])?.error, EROFS)
        XCTAssertEqual(h.open(r.nodeid)?.error, EISDIR)

        // A writable mount still keeps trees immutable.
        var o = MountOptions()
        o.writable = true
        try mount(o)
        let r2 = try lookup(3, root.description)
        let run = try lookup(r2.nodeid, "run.sh")
        XCTAssertEqual(h.open(run.nodeid, flags: O_WRONLY)?.error, EPERM)
        XCTAssertEqual(h.create(r2.nodeid, "new")?.error, EPERM)
        let fh = try XCTUnwrap(h.open(run.nodeid)).open().fh
        XCTAssertEqual(h.read(run.nodeid, fh: fh, offset: 0, size: 100)?.payload, Array(script))
        XCTAssertEqual(h.release(run.nodeid, fh: fh)?.error, 0)
        // A tree directory opened: the kernel may keep its listing.
        let dfh = try XCTUnwrap(h.opendir(r2.nodeid)).open()
        XCTAssertTrue(dfh.flags.contains(.cacheDir))
        XCTAssertEqual(try h.listAll(r2.nodeid, fh: dfh.fh).count, 7)
    }

    func testXattrsOfTreeNodes() throws {
        let root = try makeTree()
        let r = try lookup(3, root.description)
        XCTAssertEqual(h.getxattr(r.nodeid, "user.casfs.digest", size: 200)?.payload, Array(root.description.utf8))
        XCTAssertEqual(h.listxattr(r.nodeid, size: 100)?.names, ["user.casfs.digest"])
        let run = try lookup(r.nodeid, "run.sh")
        XCTAssertEqual(h.getxattr(run.nodeid, "user.casfs.digest", size: 200)?.payload, Array(Digest.of(script).description.utf8))
        let link = try lookup(r.nodeid, "link")
        XCTAssertEqual(h.getxattr(link.nodeid, "user.casfs.digest", size: 200)?.error, ENODATA)
        XCTAssertEqual(h.listxattr(link.nodeid, size: 100)?.payload, [])
    }

    func testSmallFilesFollowIntoThePageCache() throws {
        let root = try makeTree()
        let r = try lookup(3, root.description)
        // A lookup pushes nothing (the reader would win the race).
        _ = try lookup(r.nodeid, "a.txt")
        XCTAssertEqual(h.waitForNotifications(count: 1, timeout: 200).count, 0)
        // A listing: every small file it handed out, at offset 0, whole.
        let listed = try h.listAllPlus(r.nodeid)
        let files = listed.filter { $0.entry.attr.isRegular }
        XCTAssertEqual(files.count, 3)
        let all = h.waitForNotifications(count: files.count).compactMap(\.store)
        XCTAssertEqual(all.count, files.count)
        XCTAssertTrue(all.allSatisfy { $0.offset == 0 })
        let byNode = Dictionary(all.map { ($0.nodeid, Data($0.data)) }, uniquingKeysWith: { a, _ in a })
        for f in files {
            XCTAssertEqual(byNode[f.entry.nodeid], f.name == "run.sh" ? script : hello, f.name)
        }
    }

    /// `tree-directory-mode: 0755`: directories show it (unless their
    /// Directory says otherwise); the mount stays read-only.
    func testTreeDirectoryModeOption() throws {
        var o = MountOptions()
        o.treeDirectoryMode = MountOptions.parseMode("0755")
        try mount(o)
        let root = try makeTree()
        let r = try lookup(3, root.description)
        XCTAssertEqual(r.attr.permissions, 0o755)
        XCTAssertEqual(try lookup(r.nodeid, "sub").attr.permissions, 0o750, "its own unix_mode wins")
        XCTAssertEqual(try lookup(r.nodeid, "a.txt").attr.permissions, 0o444, "files unchanged")
        XCTAssertEqual(h.create(r.nodeid, "new")?.error, EROFS)
        XCTAssertNil(MountOptions.parseMode("0999"))
        XCTAssertNil(MountOptions.parseMode("1777"))
        XCTAssertEqual(MountOptions.parseMode("0o700"), 0o700)
    }

    func testForgetReleasesTreeNodes() throws {
        let root = try makeTree()
        let r = try lookup(3, root.description)
        let sub = try lookup(r.nodeid, "sub")
        let link = try lookup(r.nodeid, "link")
        h.forget(sub.nodeid, 1)
        h.forget(link.nodeid, 1)
        XCTAssertEqual(h.getattr(sub.nodeid)?.error, ENOENT)
        XCTAssertEqual(h.readlink(link.nodeid)?.error, ENOENT)
        XCTAssertEqual(h.getattr(r.nodeid)?.error, 0)
        // Looked up again: the same inode numbers (derived from the path).
        XCTAssertEqual(try lookup(r.nodeid, "sub").nodeid, sub.nodeid)
    }
}
