import CASCore
import Foundation
import TestSupport
import XCTest

/// `<mount>/tree/<root>/` and `casfs put --tree` against a live BuildGrid server,
/// compared with BuildGrid's own `bgd cas upload-dir` / `download-dir`.
final class TreeRemoteTests: RemoteTestCase {
    override func setUpWithError() throws {
        try requireFuse()
        _ = try casfsBinary()
        try super.setUpWithError()
    }

    // MARK: fixtures

    /// Files of the source tree with their mode; directories are implied, plus two empty ones.
    static let files: [(path: String, size: Int, mode: Int)] = [
        ("README.txt", 1_234, 0o644),
        ("big.bin", 3 << 20 | 12_345, 0o644),        // over the 1 MiB batch limit of put, ByteStream both ways
        ("zero-length", 0, 0o644),
        ("with space.txt", 777, 0o644),
        ("naïve-ünïcödé-日本語.txt", 4_321, 0o644),
        ("bin/run.sh", 300, 0o755),
        ("bin/tool", 70_000, 0o755),
        ("bin/data.txt", 2_000, 0o644),
        ("lib/nested/deeper/leaf.txt", 5_000, 0o644),
        ("lib/nested/deeper/deep-exec", 1_000, 0o755),
        ("lib/nested/notes.md", 99, 0o644),
        ("lib/a.so", 123_456, 0o644),
    ]
    /// Same bytes as README.txt: one blob named by several tree entries.
    static let copies: [(path: String, mode: Int)] = [("lib/README-copy.txt", 0o644), ("bin/README-exec", 0o755)]
    static let symlinks: [(path: String, target: String)] = [
        ("link-rel", "lib/nested/deeper/leaf.txt"),
        ("lib/nested/up", "../../README.txt"),
        ("bin/dangling", "no/such/file"),
        ("link-abs", "/nonexistent/absolute target"),
        ("link-dir", "lib/nested"),
    ]

    /// Builds the source tree under `tmp/<name>` and returns its absolute path.
    func makeSourceTree(_ name: String = "src-tree") throws -> String {
        let root = tmp + "/" + name
        let fm = FileManager.default
        try fm.createDirectory(atPath: root + "/empty", withIntermediateDirectories: true)
        // The same (empty) Directory blob at a second path.
        try fm.createDirectory(atPath: root + "/lib/nested/empty-too", withIntermediateDirectories: true)
        for (i, f) in Self.files.enumerated() {
            let path = root + "/" + f.path
            try fm.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try randomData(f.size, seed: 500 + UInt64(i)).write(to: URL(fileURLWithPath: path))
            XCTAssertEqual(chmod(path, mode_t(f.mode)), 0)
        }
        for c in Self.copies {
            try fm.copyItem(atPath: root + "/README.txt", toPath: root + "/" + c.path)
            XCTAssertEqual(chmod(root + "/" + c.path, mode_t(c.mode)), 0)
        }
        for s in Self.symlinks {
            try fm.createSymbolicLink(atPath: root + "/" + s.path, withDestinationPath: s.target)
        }
        return root
    }

    var bgd: String { server.venv.directory + "/bin/bgd" }
    var bgdRemote: String { "http://127.0.0.1:\(server.port)" }

    /// `bgd cas upload-dir DIR`; returns the root digest (the line whose path is DIR itself).
    func uploadDirWithBuildGrid(_ dir: String, file: StaticString = #filePath, line: UInt = #line) throws -> Digest {
        let r = runShell("\(shq(bgd)) cas --remote \(bgdRemote) upload-dir \(shq(dir))")
        guard r.ok else { throw TestSupportError("bgd cas upload-dir failed: \(r)") }
        // "Success: Pushed path=[<path>] with digest=[<hash>/<size>]", one per file and directory.
        var root: Digest?
        var pushed = 0
        for l in r.stdout.split(separator: "\n") where l.hasPrefix("Success: Pushed path=[") {
            pushed += 1
            guard let pathEnd = l.range(of: "] with digest=["), l.hasSuffix("]") else { continue }
            let path = l[l.index(l.startIndex, offsetBy: "Success: Pushed path=[".count)..<pathEnd.lowerBound]
            let hs = l[pathEnd.upperBound..<l.index(before: l.endIndex)].split(separator: "/")
            if path == dir, hs.count == 2 { root = Digest(parsing: "\(hs[0])_\(hs[1])") }
        }
        XCTAssertFalse(r.stderr.contains("Error"), r.stderr, file: file, line: line)
        guard let root else { throw TestSupportError("no root digest for \(dir) in bgd's output:\n\(r.stdout)") }
        XCTAssertGreaterThan(pushed, Self.files.count, "bgd pushed too few nodes:\n\(r.stdout)", file: file, line: line)
        return root
    }

    /// `bgd cas download-dir <hash>/<size> OUT`.
    func downloadDirWithBuildGrid(_ d: Digest, to out: String) throws {
        let r = runShell("\(shq(bgd)) cas --remote \(bgdRemote) download-dir \(d.hash)/\(d.size) \(shq(out))")
        guard r.ok, !r.stderr.contains("Error") else { throw TestSupportError("bgd cas download-dir failed: \(r)") }
    }

    /// `casfs put --tree DIR` with the given config; returns the printed root digest.
    func putTree(_ dir: String, config: String, file: StaticString = #filePath, line: UInt = #line) throws -> Digest {
        let r = runShell("\(shq(try casfsBinary())) put --quiet --tree --config \(shq(config)) \(shq(dir))")
        guard r.ok else { throw TestSupportError("casfs put --tree failed: \(r)") }
        let lines = r.stdout.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, r.stdout, file: file, line: line)
        let parts = try XCTUnwrap(lines.first, file: file, line: line).components(separatedBy: "  ")
        XCTAssertEqual(parts.count, 2, r.stdout, file: file, line: line)
        XCTAssertEqual(parts.last, dir, file: file, line: line)
        let name = try XCTUnwrap(parts.first, file: file, line: line)
        XCTAssertTrue(name.hasPrefix("tree/"), name, file: file, line: line)
        return try XCTUnwrap(Digest(parsing: String(name.dropFirst("tree/".count))), "bad digest in \(name)",
                             file: file, line: line)
    }

    func remoteOnlyConfig() throws -> String {
        let path = tmp + "/remote-only.yaml"
        try """
            storage: !remote-storage
              url: \(server.url)
              request-timeout: 30s

            """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    func treePath(_ m: CasfsMount, _ root: Digest) -> String { "\(m.mountpoint)/tree/\(root)" }

    /// `type relpath` for everything under `dir`, sorted (C collation).
    func listing(_ dir: String) -> [String] {
        mustSh("cd \(shq(dir)) && find . -mindepth 1 -printf '%y %P\\n' | LC_ALL=C sort")
            .split(separator: "\n").map(String.init)
    }

    /// relpath → permission bits, for the regular files under `dir`.
    func fileModes(_ dir: String) -> [String: Int] {
        var out: [String: Int] = [:]
        for l in mustSh("cd \(shq(dir)) && find . -type f -printf '%m %P\\n'").split(separator: "\n") {
            let sp = l.firstIndex(of: " ")!
            out[String(l[l.index(after: sp)...])] = Int(l[..<sp], radix: 8)
        }
        return out
    }

    /// relpath → readlink, for the symlinks under `dir`.
    func symlinkTargets(_ dir: String) -> [String: String] {
        var out: [String: String] = [:]
        for l in mustSh("cd \(shq(dir)) && find . -type l -printf '%P\\t%l\\n'").split(separator: "\n") {
            let parts = l.split(separator: "\t", maxSplits: 1, omittingEmptySubsequences: false)
            out[String(parts[0])] = String(parts[1])
        }
        return out
    }

    func assertSameTree(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) {
        let r = runShell("diff -r --no-dereference \(shq(a)) \(shq(b))")
        XCTAssertTrue(r.ok && r.stdout.isEmpty, "diff -r --no-dereference \(a) \(b):\n\(r)", file: file, line: line)
    }

    var expectedSymlinks: [String: String] {
        Dictionary(uniqueKeysWithValues: Self.symlinks.map { ($0.path, $0.target) })
    }

    var expectedExecutable: [String: Bool] {
        var e: [String: Bool] = [:]
        for f in Self.files { e[f.path] = f.mode & 0o111 != 0 }
        for c in Self.copies { e[c.path] = c.mode & 0o111 != 0 }
        return e
    }

    // MARK: 1. a tree uploaded by BuildGrid, read through the mount

    func testTreeUploadedByBuildGridReadsLikeBuildGridsDownload() throws {
        let src = try makeSourceTree()
        let root = try uploadDirWithBuildGrid(src)
        let down = tmp + "/bg-download"
        try downloadDirWithBuildGrid(root, to: down)

        // BuildGrid's own round trip keeps every node kind used here: empty
        // directories (an empty Directory blob), relative, absolute and
        // dangling symlinks (SymlinkNode, written back with os.symlink), the
        // executable bit (set to 0755 on download), UTF-8 and spaced names.
        // So nothing needs to be left out of the comparison below.
        assertSameTree(src, down)
        XCTAssertEqual(listing(down), listing(src))

        let m = try mount(remoteConfig())
        let tree = treePath(m, root)
        XCTAssertEqual(listing(tree), listing(down))
        assertSameTree(tree, down)
        assertSameTree(tree, src)
        mustSh("test -d \(shq(tree + "/empty")) && test -z \"$(ls -A \(shq(tree + "/empty")))\"")

        // Permission bits: casfs shows 0555 / 0444; BuildGrid writes 0755 / its umask default.
        let viaMount = fileModes(tree), viaBuildGrid = fileModes(down)
        XCTAssertEqual(Set(viaMount.keys), Set(expectedExecutable.keys))
        XCTAssertEqual(Set(viaBuildGrid.keys), Set(expectedExecutable.keys))
        for (path, exec) in expectedExecutable {
            XCTAssertEqual(viaMount[path], exec ? 0o555 : 0o444, "mode of \(path) through the mount")
            XCTAssertEqual((viaBuildGrid[path] ?? 0) & 0o111 != 0, exec, "executable bit of \(path) from BuildGrid")
        }
        // `find -perm`: the same set of executable files on both sides.
        let execMount = mustSh("cd \(shq(tree)) && find . -type f -perm -0100 -printf '%P\\n' | LC_ALL=C sort")
        let execBG = mustSh("cd \(shq(down)) && find . -type f -perm -0100 -printf '%P\\n' | LC_ALL=C sort")
        XCTAssertEqual(execMount, execBG)
        XCTAssertEqual(execMount.split(separator: "\n").count, expectedExecutable.values.filter { $0 }.count)

        // Symlinks are text: the same targets, not resolved.
        XCTAssertEqual(symlinkTargets(tree), expectedSymlinks)
        XCTAssertEqual(symlinkTargets(down), expectedSymlinks)
        // A relative link inside the tree resolves inside it.
        mustSh("cmp \(shq(tree + "/link-rel")) \(shq(src + "/lib/nested/deeper/leaf.txt"))")
        mustSh("cmp \(shq(tree + "/lib/nested/up")) \(shq(src + "/README.txt"))")
        mustSh("test -d \(shq(tree + "/link-dir/deeper"))")

        // Each file's bytes are the blob /sha256/<digest> (checked by name, not by re-reading the tree).
        let big = try Data(contentsOf: URL(fileURLWithPath: src + "/big.bin"))
        mustSh("cmp \(shq(tree + "/big.bin")) \(shq(m.path(Digest.of(big))))")
        // A name that is not in the Directory is absent.
        XCTAssertFalse(runShell("test -e \(shq(tree + "/no-such-name"))").ok)
    }

    // MARK: 2. casfs put --tree against BuildGrid

    func testPutTreeGivesBuildGridsRootDigestAndReadsBack() throws {
        let src = try makeSourceTree()
        // casfs stores the tree into BuildGrid first: nothing of it is there before.
        let casfsRoot = try putTree(src, config: try remoteOnlyConfig())
        XCTAssertEqual(try missingPerBuildGrid([casfsRoot]), [], "the root Directory is in BuildGrid")

        // BuildGrid reads casfs's tree back with its own client.
        let down = tmp + "/bg-download"
        try downloadDirWithBuildGrid(casfsRoot, to: down)
        assertSameTree(src, down)

        // The same root digest as BuildGrid computes for the same directory.
        let bgRoot = try uploadDirWithBuildGrid(src)
        XCTAssertEqual(casfsRoot, bgRoot)

        let m = try mount(remoteConfig())
        let tree = treePath(m, casfsRoot)
        assertSameTree(tree, src)
        XCTAssertEqual(listing(tree), listing(src))
        XCTAssertEqual(symlinkTargets(tree), expectedSymlinks)
        for (path, exec) in expectedExecutable {
            XCTAssertEqual(fileModes(tree)[path], exec ? 0o555 : 0o444, path)
        }
    }

    func testPutTreeThroughTheMountsConfig() throws {
        let src = try makeSourceTree()
        let bgRoot = try uploadDirWithBuildGrid(src)
        // A second, different tree is stored through the config a mount uses (cache in front of BuildGrid).
        let other = try makeSourceTree("other-tree")
        try randomData(10_000, seed: 77).write(to: URL(fileURLWithPath: other + "/lib/extra.bin"))
        XCTAssertEqual(chmod(other + "/README.txt", 0o700), 0)
        let m = try mount(remoteConfig())
        let otherRoot = try putTree(other, config: m.configPath)
        XCTAssertNotEqual(otherRoot, bgRoot)
        XCTAssertEqual(otherRoot, try uploadDirWithBuildGrid(other))
        XCTAssertEqual(try putTree(src, config: m.configPath), bgRoot)
        assertSameTree(treePath(m, otherRoot), other)
        assertSameTree(treePath(m, bgRoot), src)
        XCTAssertEqual(fileModes(treePath(m, otherRoot))["README.txt"], 0o555)
        XCTAssertEqual(fileModes(treePath(m, bgRoot))["README.txt"], 0o444)
    }

    // MARK: 3. inodes

    func testPlainTreeFileIsTheBlobsInode() throws {
        let src = try makeSourceTree()
        let root = try uploadDirWithBuildGrid(src)
        let m = try mount(remoteConfig())
        let tree = treePath(m, root)
        let readme = Digest.of(try Data(contentsOf: URL(fileURLWithPath: src + "/README.txt")))
        let leaf = Digest.of(try Data(contentsOf: URL(fileURLWithPath: src + "/lib/nested/deeper/leaf.txt")))
        func ino(_ p: String) -> String { mustSh("stat -L -c %i \(shq(p))").trimmingCharacters(in: .whitespacesAndNewlines) }

        let blobIno = ino(m.path(readme))
        XCTAssertFalse(blobIno.isEmpty)
        XCTAssertEqual(ino(tree + "/README.txt"), blobIno)
        XCTAssertEqual(ino(tree + "/lib/README-copy.txt"), blobIno, "the same blob in another directory")
        XCTAssertEqual(ino(tree + "/lib/nested/deeper/leaf.txt"), ino(m.path(leaf)))
        XCTAssertNotEqual(ino(tree + "/README.txt"), ino(tree + "/lib/nested/deeper/leaf.txt"))
        // The executable copy of the same bytes is a variant, not the blob's inode.
        XCTAssertNotEqual(ino(tree + "/bin/README-exec"), blobIno)
        mustSh("cmp \(shq(tree + "/bin/README-exec")) \(shq(m.path(readme)))")
        XCTAssertEqual(mustSh("stat -c %a \(shq(m.path(readme)))"), "444\n")
        // Through a symlink the kernel reaches the same inode.
        XCTAssertEqual(ino(tree + "/lib/nested/up"), blobIno)
    }

    // MARK: 4. read-only

    /// Tries one change with Python's os calls; prints OK or the errno name.
    func attempt(_ op: String, _ path: String, _ arg: String = "") -> String {
        let script = """
            import errno, os, sys
            op, p, a = sys.argv[1], sys.argv[2], sys.argv[3]
            try:
                if op == "write-trunc":
                    fd = os.open(p, os.O_WRONLY | os.O_TRUNC); os.write(fd, b"x"); os.close(fd)
                elif op == "write-same":
                    data = open(a, "rb").read()
                    fd = os.open(p, os.O_WRONLY | os.O_TRUNC); os.write(fd, data); os.close(fd)
                elif op == "write": fd = os.open(p, os.O_WRONLY); os.write(fd, b"x"); os.close(fd)
                elif op == "append": fd = os.open(p, os.O_WRONLY | os.O_APPEND); os.write(fd, b"x"); os.close(fd)
                elif op == "create": fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644); os.close(fd)
                elif op == "truncate": os.truncate(p, 0)
                elif op == "mkdir": os.mkdir(p)
                elif op == "rmdir": os.rmdir(p)
                elif op == "unlink": os.unlink(p)
                elif op == "rename": os.rename(p, a)
                elif op == "symlink": os.symlink("target", p)
                elif op == "link": os.link(p, a)
                elif op == "chmod": os.chmod(p, 0o777)
                elif op == "setxattr": os.setxattr(p, "user.test", b"v")
                else: raise SystemExit("unknown op " + op)
                print("OK")
            except OSError as e:
                print(errno.errorcode.get(e.errno, str(e.errno)))
            """
        let r = runShell("python3 -c \(shq(script)) \(shq(op)) \(shq(path)) \(shq(arg))")
        XCTAssertEqual(r.stderr, "", "\(op) \(path)")
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Every kind of change inside the tree; returns "op path" → errno name.
    func tryChanges(_ tree: String, readmeSource: String) -> [String: String] {
        var got: [String: String] = [:]
        let cases: [(String, String, String)] = [
            ("write-trunc", "README.txt", ""),
            ("write-same", "README.txt", readmeSource),
            ("write", "README.txt", ""),
            ("append", "bin/run.sh", ""),
            ("write-trunc", "bin/README-exec", ""),
            ("truncate", "lib/nested/deeper/leaf.txt", ""),
            ("create", "new-file", ""),
            ("create", "lib/nested/new-file", ""),
            ("mkdir", "new-dir", ""),
            ("mkdir", "empty/sub", ""),
            ("rmdir", "empty", ""),
            ("rmdir", "lib/nested/deeper", ""),
            ("unlink", "README.txt", ""),
            ("unlink", "bin/run.sh", ""),
            ("unlink", "link-rel", ""),
            ("rename", "with space.txt", tree + "/renamed.txt"),
            ("rename", "lib", tree + "/lib2"),
            ("symlink", "new-link", ""),
            ("link", "README.txt", tree + "/hard-link"),
            ("chmod", "README.txt", ""),
            ("chmod", "bin", ""),
            ("setxattr", "README.txt", ""),
        ]
        for (op, rel, arg) in cases { got["\(op) \(rel)"] = attempt(op, tree + "/" + rel, arg) }
        return got
    }

    func assertTreeUnchanged(_ tree: String, _ src: String, file: StaticString = #filePath, line: UInt = #line) {
        assertSameTree(tree, src, file: file, line: line)
        XCTAssertEqual(listing(tree), listing(src), file: file, line: line)
    }

    func testReadOnlyMountRefusesChangesInTreeWithEROFS() throws {
        let src = try makeSourceTree()
        let root = try uploadDirWithBuildGrid(src)
        let m = try mount(remoteConfig(writable: false))
        let tree = treePath(m, root)
        assertSameTree(tree, src)
        let got = tryChanges(tree, readmeSource: src + "/README.txt")
        for (what, errno) in got.sorted(by: { $0.key < $1.key }) {
            XCTAssertEqual(errno, "EROFS", what)
        }
        // Shell tools see the same.
        let r = runShell("echo x > \(shq(tree + "/README.txt"))")
        XCTAssertFalse(r.ok)
        XCTAssertTrue(r.stderr.contains("Read-only file system"), r.stderr)
        assertTreeUnchanged(tree, src)
        XCTAssertTrue(m.isRunning)
    }

    /// Opening a plain (non-executable) tree file with O_TRUNC for writing; kept
    /// apart from the other changes below.
    static let plainFileRewrites: Set<String> = ["write-trunc README.txt", "write-same README.txt"]

    func testWritableMountRefusesChangesInTreeWithEPERM() throws {
        let src = try makeSourceTree()
        let root = try uploadDirWithBuildGrid(src)
        let m = try mount(remoteConfig(writable: true))
        let tree = treePath(m, root)
        assertSameTree(tree, src)
        let got = tryChanges(tree, readmeSource: src + "/README.txt")
        XCTAssertEqual(got.count, 22)
        for (what, errno) in got.sorted(by: { $0.key < $1.key }) where !Self.plainFileRewrites.contains(what) {
            XCTAssertEqual(errno, "EPERM", what)
        }
        assertTreeUnchanged(tree, src)
        XCTAssertTrue(m.isRunning)
        // /sha256 of the same mount stays writable.
        let f = try localFile(randomData(5000, seed: 9))
        mustSh("cp \(shq(f.path)) \(shq(m.path(f.digest)))")
        XCTAssertEqual(try missingPerBuildGrid([f.digest]), [])
    }

    /// A plain file of a tree is the blob's own inode (one page cache with
    /// /sha256/<digest>), so on a writable mount open(O_WRONLY|O_TRUNC) of
    /// <mount>/tree/<root>/README.txt is a rewrite of that blob, with the
    /// blob's rules: other bytes fail at close() with EIO and change nothing,
    /// the same bytes are a no-op. An executable (its own inode) is EPERM at
    /// open. Either way the tree never changes.
    func testWritableMountTreatsWritingAPlainTreeFileAsRewritingItsBlob() throws {
        let src = try makeSourceTree()
        let root = try uploadDirWithBuildGrid(src)
        let m = try mount(remoteConfig(writable: true))
        let tree = treePath(m, root)
        XCTAssertEqual(attempt("write-trunc", tree + "/bin/README-exec"), "EPERM")
        XCTAssertEqual(attempt("write-trunc", tree + "/README.txt"), "EIO", "other bytes: refused at close")
        XCTAssertEqual(attempt("write-same", tree + "/README.txt", src + "/README.txt"), "OK", "the same bytes: a no-op")
        assertTreeUnchanged(tree, src)
    }
}
