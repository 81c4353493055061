import CASProcess
@testable import CASSandbox
import Foundation
import TestSupport
import XCTest

/// Removing scratch trees relative to descriptors, as `rm -rf` does.
final class TreeRemoverTests: XCTestCase {
    var tmp = ""

    override func setUpWithError() throws {
        tmp = try makeMountTempDir("TreeRemoverTests")
    }

    override func tearDown() {
        if !tmp.isEmpty { _ = runShell("chmod -R u+rwx \(shq(tmp)); rm -rf \(shq(tmp))") }
    }

    /// `levels` directories named `name` one in another under `root`, made
    /// relative to descriptors (the full path is longer than PATH_MAX), a
    /// file at the bottom; `modes` sets a level's mode once its child exists.
    func makeDeepTree(_ root: String, levels: Int, name: String = "aaaaaaaa", modes: [Int: mode_t] = [:]) throws {
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        var fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        for level in 0..<levels {
            XCTAssertEqual(mkdirat(fd, name, 0o755), 0, "mkdir at level \(level): \(String(cString: strerror(errno)))")
            let child = openat(fd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            XCTAssertGreaterThanOrEqual(child, 0)
            if let mode = modes[level] { fchmod(child, mode) }
            close(fd)
            fd = child
        }
        let f = openat(fd, "bottom", O_WRONLY | O_CREAT | O_CLOEXEC, 0o444)
        XCTAssertGreaterThanOrEqual(f, 0)
        close(f)
        close(fd)
    }

    func testATreeDeeperThanPathMaxIsRemoved() throws {
        let root = tmp + "/deep"
        // 600 × 9 bytes: more than PATH_MAX (4096).
        try makeDeepTree(root, levels: 600, modes: [300: 0o555, 450: 0o500, 599: 0o000])
        XCTAssertFalse(runShell("find \(shq(root)) -maxdepth 0").stdout.isEmpty)
        try TreeRemover.remove(root)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root))
    }

    func testSymlinksAreRemovedNotFollowed() throws {
        let root = tmp + "/links"
        let outside = tmp + "/outside"
        try FileManager.default.createDirectory(atPath: outside + "/dir", withIntermediateDirectories: true)
        try "keep\n".write(toFile: outside + "/file", atomically: true, encoding: .utf8)
        try FileManager.default.createDirectory(atPath: root + "/sub", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: root + "/to-file", withDestinationPath: outside + "/file")
        try FileManager.default.createSymbolicLink(atPath: root + "/sub/to-dir", withDestinationPath: outside + "/dir")
        try FileManager.default.createSymbolicLink(atPath: root + "/dangling", withDestinationPath: "/no/such/thing")
        XCTAssertTrue(runShell("mkfifo \(shq(root + "/sub/fifo"))").ok)
        try TreeRemover.remove(root)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root))
        XCTAssertEqual(try String(contentsOfFile: outside + "/file", encoding: .utf8), "keep\n")
        XCTAssertTrue(FileManager.default.fileExists(atPath: outside + "/dir"))
    }

    func testNamesThatAreNotUTF8AndManyEntries() throws {
        let root = tmp + "/names"
        XCTAssertTrue(runShell("""
            mkdir -p \(shq(root)) && cd \(shq(root)) && mkdir "$(printf 'd\\377ir')" && touch "$(printf 'd\\377ir')/$(printf 'f\\376')" \
            && touch "$(printf 'fi\\377le')" && for i in $(seq 1 300); do mkdir d$i; touch d$i/x f$i; done
            """).ok)
        try TreeRemover.remove(root)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root))
    }

    func testAMountInsideIsNotEntered() throws {
        let root = tmp + "/mounted"
        try FileManager.default.createDirectory(atPath: root + "/a/m", withIntermediateDirectories: true)
        XCTAssertTrue(runShell("mount -t tmpfs none \(shq(root + "/a/m")) && touch \(shq(root + "/a/m/inside"))").ok,
                      "mounting a tmpfs needs root")
        defer { _ = runShell("umount \(shq(root + "/a/m")) 2>/dev/null") }
        XCTAssertThrowsError(try TreeRemover.remove(root)) { e in
            XCTAssertTrue("\(e)".contains("another filesystem"), "\(e)")
        }
        XCTAssertTrue(FileManager.default.fileExists(atPath: root + "/a/m/inside"), "nothing removed in the mount")
        XCTAssertTrue(runShell("umount \(shq(root + "/a/m"))").ok)
        try TreeRemover.remove(root)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root))
    }

    /// The directory a tree is in is not the tree's: its mode stays as it
    /// is, whether the tree holds read-only directories or its own removal
    /// is refused (an append-only directory refuses even root).
    func testTheDirectoryATreeIsInKeepsItsMode() throws {
        let parent = tmp + "/parent"
        let root = parent + "/tree"
        try FileManager.default.createDirectory(atPath: root + "/ro/sub", withIntermediateDirectories: true)
        try "x".write(toFile: root + "/ro/sub/file", atomically: true, encoding: .utf8)
        XCTAssertEqual(chmod(root + "/ro/sub", 0o555), 0)
        XCTAssertEqual(chmod(root + "/ro", 0o555), 0)
        XCTAssertEqual(chmod(parent, 0o751), 0)
        try TreeRemover.remove(root)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root))
        XCTAssertEqual(try mode(parent), 0o751)

        // An append-only directory cannot be removed, not even by root.
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        XCTAssertTrue(runShell("chattr +a \(shq(root))").ok, "chattr +a needs root and a filesystem with attributes")
        defer { _ = runShell("chattr -a \(shq(root))") }
        XCTAssertThrowsError(try TreeRemover.remove(root)) { e in
            XCTAssertEqual((e as? TreeRemover.Failure)?.code, EPERM, "\(e)")
        }
        XCTAssertEqual(try mode(parent), 0o751, "the directory the tree is in was changed")
        XCTAssertTrue(runShell("chattr -a \(shq(root))").ok)
        try TreeRemover.remove(root)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root))
        XCTAssertEqual(try mode(parent), 0o751)
    }

    /// Making a directory of the tree accessible again does not follow a
    /// symlink put in its place, nor change a directory of another mount.
    func testMakingADirectoryAccessibleChangesOnlyADirectoryOfTheTree() throws {
        let root = tmp + "/tree"
        let outside = tmp + "/outside"
        try FileManager.default.createDirectory(atPath: root + "/closed", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: root + "/bound", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: outside + "/target", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: root + "/link", withDestinationPath: outside)
        XCTAssertEqual(chmod(outside, 0o500), 0)
        XCTAssertEqual(chmod(outside + "/target", 0o500), 0)
        XCTAssertEqual(chmod(root + "/closed", 0o000), 0)
        XCTAssertTrue(runShell("mount --bind \(shq(outside + "/target")) \(shq(root + "/bound"))").ok, "a bind mount needs root")
        defer { _ = runShell("umount \(shq(root + "/bound")) 2>/dev/null") }
        let fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        let tree = try XCTUnwrap(TreeRemover.Tree(root: fd))
        XCTAssertNotNil(tree.mount, "the mount ID is read from /proc/self/fdinfo")
        TreeRemover.makeAccessible(fd, "link", in: tree)
        TreeRemover.makeAccessible(fd, "bound", in: tree)
        TreeRemover.makeAccessible(fd, "closed", in: tree)
        XCTAssertEqual(try mode(outside), 0o500, "a symlink was followed")
        XCTAssertEqual(try mode(outside + "/target"), 0o500, "a bind mount's directory was changed")
        XCTAssertEqual(try mode(root + "/closed"), 0o700)
    }

    /// A bind mount of the same filesystem (same st_dev) is a mount point
    /// too: not entered, what it shows survives, and the removal says why.
    func testABindMountInsideIsNotEntered() throws {
        let root = tmp + "/bind"
        let other = tmp + "/other"
        try FileManager.default.createDirectory(atPath: root + "/a/m", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: other + "/deeper", withIntermediateDirectories: true)
        try "keep\n".write(toFile: other + "/deeper/inside", atomically: true, encoding: .utf8)
        XCTAssertTrue(runShell("mount --bind \(shq(other)) \(shq(root + "/a/m"))").ok, "a bind mount needs root")
        defer { _ = runShell("umount \(shq(root + "/a/m")) 2>/dev/null") }
        var a = stat(), b = stat()
        XCTAssertEqual(stat(root + "/a", &a), 0)
        XCTAssertEqual(stat(root + "/a/m", &b), 0)
        XCTAssertEqual(a.st_dev, b.st_dev, "the bind mount is of the same filesystem")
        XCTAssertThrowsError(try TreeRemover.remove(root)) { e in
            XCTAssertTrue("\(e)".contains("/m is a mount point"), "\(e)")
            XCTAssertEqual((e as? TreeRemover.Failure)?.code, EXDEV)
        }
        XCTAssertEqual(try String(contentsOfFile: other + "/deeper/inside", encoding: .utf8), "keep\n")
        XCTAssertEqual(try String(contentsOfFile: root + "/a/m/deeper/inside", encoding: .utf8), "keep\n")
        XCTAssertTrue(runShell("umount \(shq(root + "/a/m"))").ok)
        try TreeRemover.remove(root)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root))
        XCTAssertTrue(FileManager.default.fileExists(atPath: other + "/deeper/inside"))
    }

    func mode(_ path: String) throws -> mode_t {
        var st = stat()
        guard lstat(path, &st) == 0 else { throw TreeRemover.Failure(description: "lstat \(path)", code: errno) }
        return st.st_mode & 0o7777
    }

    func testAFileOrNothingIsFine() throws {
        try "x".write(toFile: tmp + "/plain", atomically: true, encoding: .utf8)
        try TreeRemover.remove(tmp + "/plain")
        XCTAssertFalse(FileManager.default.fileExists(atPath: tmp + "/plain"))
        XCTAssertNoThrow(try TreeRemover.remove(tmp + "/never-was"))
    }

    // MARK: scratch directories

    func testScratchDirectoryIsLockedUntilRemoved() throws {
        let s = try ScratchDirectory(in: tmp, prefix: "casfs-test-")
        XCTAssertTrue((s.path as NSString).lastPathComponent.hasPrefix("casfs-test-\(getpid())-"))
        try makeDeepTree(s.path + "/out", levels: 500)
        XCTAssertEqual(ScratchDirectory.removeStale(in: tmp, prefix: "casfs-test-") { _ in true }, [],
                       "a held directory is not stale")
        XCTAssertTrue(FileManager.default.fileExists(atPath: s.path))
        try s.remove()
        XCTAssertFalse(FileManager.default.fileExists(atPath: s.path))
    }

    func testStaleDirectoriesGoWithTheirMounts() throws {
        // A killed run: the directory and its lock file, nobody holding it, a mount inside.
        let stale = tmp + "/casfs-test-1-abcdef"
        try makeDeepTree(stale + "/out", levels: 480)
        FileManager.default.createFile(atPath: stale + "/.lock", contents: nil)
        try FileManager.default.createDirectory(atPath: stale + "/mnt", withIntermediateDirectories: true)
        XCTAssertTrue(runShell("mount -t tmpfs none \(shq(stale + "/mnt"))").ok)
        // A live run: its lock is held by another process.
        let live = tmp + "/casfs-test-2-ghijkl"
        try FileManager.default.createDirectory(atPath: live, withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: live + "/.lock", contents: nil)
        let holder = try Spawn.start("/usr/bin/flock", ["flock", "-x", live + "/.lock", "sleep", "600"], processGroup: true).get()
        var held = true
        func release() {
            guard held else { return }
            held = false
            kill(-holder, SIGKILL)
            _ = Spawn.wait(holder)
        }
        defer { release() }
        XCTAssertTrue(pollUntil(30) { runShell("flock -n -x \(shq(live + "/.lock")) true").status != 0 })
        // Not ours to judge: no lock file.
        let foreign = tmp + "/casfs-test-3-mnopqr"
        try FileManager.default.createDirectory(atPath: foreign, withIntermediateDirectories: true)

        var unmounted: [String] = []
        let outcomes = ScratchDirectory.removeStale(in: tmp, prefix: "casfs-test-") { mp in
            unmounted.append(mp)
            return runShell("umount \(shq(mp))").ok
        }
        XCTAssertEqual(outcomes, [ScratchDirectory.StaleOutcome(path: stale, error: nil)])
        XCTAssertEqual(unmounted, [stale + "/mnt"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: stale))
        XCTAssertTrue(FileManager.default.fileExists(atPath: live))
        XCTAssertTrue(FileManager.default.fileExists(atPath: foreign))

        release()
        // The holder's child (sleep) may still be exiting, its copy of the lock with it.
        XCTAssertTrue(pollUntil(30) { runShell("flock -n -x \(shq(live + "/.lock")) true").ok })
        XCTAssertEqual(ScratchDirectory.removeStale(in: tmp, prefix: "casfs-test-") { _ in true },
                       [ScratchDirectory.StaleOutcome(path: live, error: nil)])
    }
}
