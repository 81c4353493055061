import CASCore
import Foundation
import TestSupport
import XCTest

/// The mount helpers and `casfs put` driven as a user or an operator would.
final class HelperTests: XCTestCase {
    var dir = ""
    var redis: RedisServer!
    var casfs = ""
    var mnt: String { dir + "/mnt" }
    var config: String { dir + "/casfs.yaml" }
    let helpers = BuildGridVenv.packageRoot + "/mount-helpers"

    override func setUpWithError() throws {
        try requireFuse()
        casfs = try casfsBinary()
        dir = try makeMountTempDir("casfs-helpers")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        redis = try RedisServer.unixSocket()
        try """
        storage: !redis-index
          redis: !redis-connection
            unix-socket: \(redis.socketPath!)
          storage: !disk-storage
            path: \(dir)/store
        mount:
          writable: true
        """.write(toFile: config, atomically: true, encoding: .utf8)
    }

    override func tearDown() {
        if isFuseMounted(mnt) { runShell("fusermount3 -u \(shq(mnt)) || fusermount3 -uz \(shq(mnt))") }
        redis?.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    func sh(_ command: String) -> ShellResult { runShell(command) }

    /// Stores a file with `casfs put` and returns its digest.
    func put(_ content: String) throws -> Digest {
        let file = dir + "/in-\(UUID().uuidString)"
        try content.write(toFile: file, atomically: true, encoding: .utf8)
        let r = sh("\(shq(casfs)) put --config \(shq(config)) \(shq(file))")
        XCTAssertTrue(r.ok, "\(r)")
        let d = Digest.of(Data(content.utf8))
        XCTAssertEqual(r.stdout, "sha256/\(d)  \(file)\n")
        return d
    }

    func testPutThenReadThroughMount() throws {
        let d = try put("stored with casfs put\n")
        let tree = dir + "/tree"
        for i in 0..<20 {
            try FileManager.default.createDirectory(atPath: "\(tree)/d\(i % 4)", withIntermediateDirectories: true)
            try String(repeating: "line \(i)\n", count: i * 100).write(toFile: "\(tree)/d\(i % 4)/f\(i)", atomically: true, encoding: .utf8)
        }
        let putTree = sh("\(shq(casfs)) put --config \(shq(config)) \(shq(tree))")
        XCTAssertTrue(putTree.ok, "\(putTree)")
        let r = sh("\(shq(casfs)) mount --config \(shq(config)) \(shq(mnt))")
        XCTAssertTrue(r.ok, "\(r)")
        XCTAssertEqual(sh("cat \(shq(mnt))/sha256/\(d)").stdout, "stored with casfs put\n")
        // Every file of the tree reads back identical through the mount, by the path put printed.
        let lines = putTree.stdout.split(separator: "\n").map { $0.components(separatedBy: "  ") }
        XCTAssertEqual(lines.count, 20)
        for l in lines {
            XCTAssertTrue(sh("cmp \(shq(mnt))/\(l[0]) \(shq(l[1]))").ok, "\(l[1]) differs through the mount")
        }
        // A second mount on the same mount point is refused with one line, and the first keeps working.
        let again = sh("\(shq(casfs)) mount --config \(shq(config)) \(shq(mnt))")
        XCTAssertFalse(again.ok)
        XCTAssertEqual(again.stderr.split(separator: "\n").count, 1, again.stderr)
        XCTAssertTrue(again.stderr.contains("already"), again.stderr)
        XCTAssertEqual(sh("cat \(shq(mnt))/sha256/\(d)").stdout, "stored with casfs put\n")
        XCTAssertTrue(sh("fusermount3 -u \(shq(mnt))").ok)
    }

    /// `mount -t fuse.casfs CONFIG DIR -o rw` through /sbin/mount.fuse.casfs.
    func testMountTypeFuseCasfs() throws {
        let installed = "/sbin/mount.fuse.casfs"
        var st = stat()
        if lstat(installed, &st) == 0 {
            let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: installed)) ?? ""
            if target != helpers + "/mount.fuse.casfs" && !sh("cmp -s \(shq(installed)) \(shq(helpers))/mount.fuse.casfs").ok {
                return XCTFail("\(installed) exists and is not this project's helper; refusing to replace it")
            }
        } else {
            XCTAssertEqual(symlink(helpers + "/mount.fuse.casfs", installed), 0, "cannot install \(installed)")
        }
        defer { if (try? FileManager.default.destinationOfSymbolicLink(atPath: installed)) == helpers + "/mount.fuse.casfs" { unlink(installed) } }

        let d = try put("mounted by mount(8)\n")
        let r = sh("CASFS=\(shq(casfs)) mount -t fuse.casfs \(shq(config)) \(shq(mnt)) -o rw,nodev")
        XCTAssertTrue(r.ok, "\(r)")
        XCTAssertTrue(isFuseMounted(mnt), "mount returned before the mount was ready")
        XCTAssertEqual(sh("cat \(shq(mnt))/sha256/\(d)").stdout, "mounted by mount(8)\n")
        XCTAssertTrue(sh("grep -q \(shq(mnt)) /proc/mounts").ok)
        XCTAssertTrue(sh("umount \(shq(mnt))").ok)
        XCTAssertTrue(pollUntil(10) { !isFuseMounted(self.mnt) })

        let ro = sh("CASFS=\(shq(casfs)) mount -t fuse.casfs \(shq(config)) \(shq(mnt)) -o ro")
        XCTAssertTrue(ro.ok, "\(ro)")
        let write = sh("echo x > \(shq(mnt))/sha256/\(Digest.of(Data("x\n".utf8)))")
        XCTAssertFalse(write.ok)
        XCTAssertTrue(write.stderr.contains("Read-only file system"), write.stderr)
        XCTAssertTrue(sh("umount \(shq(mnt))").ok)
    }

    /// The sandbox sees the mount read-only at /cas, has no network, sees host paths only when bound, and
    /// can write only its output dir.
    func testSandboxReadsInputsAndCannotWriteThem() throws {
        guard sh("command -v bwrap").ok else { return XCTFail("bubblewrap is not installed (apt-get install bubblewrap)") }
        let d = try put("an input of a build step\n")
        XCTAssertTrue(sh("\(shq(casfs)) mount --config \(shq(config)) \(shq(mnt))").ok)
        // casfs-sandbox is `casfs run` without an input root; CASFS names the binary under test.
        let sandbox = "CASFS=\(shq(casfs)) \(shq(helpers))/casfs-sandbox --mount \(shq(mnt))"
        let sum = sh("\(sandbox) -- sha256sum /cas/sha256/\(d)")
        XCTAssertTrue(sum.ok, "\(sum)")
        XCTAssertEqual(sum.stdout, "\(d.hash)  /cas/sha256/\(d)\n")

        let other = Digest.of(Data("y\n".utf8))
        let write = sh("\(sandbox) -- sh -c 'echo y > /cas/sha256/\(other)'")
        XCTAssertFalse(write.ok, "a write into the inputs must fail")
        XCTAssertTrue(write.stderr.contains("Read-only file system"), write.stderr)
        XCTAssertFalse(sh("\(sandbox) -- rm /cas/sha256/\(d)").ok)
        XCTAssertEqual(sh("cat \(shq(mnt))/sha256/\(d)").stdout, "an input of a build step\n", "input still there")

        let out = dir + "/out"
        let build = sh("\(sandbox) --writable-dir \(shq(out)) -- sh -c 'tr a-z A-Z < /cas/sha256/\(d) > \(out)/result'")
        XCTAssertTrue(build.ok, "\(build)")
        XCTAssertEqual(try String(contentsOfFile: out + "/result", encoding: .utf8), "AN INPUT OF A BUILD STEP\n")
        // Host paths are there only when bound: --ro-bind read-only, --bind writable.
        XCTAssertEqual(sh("\(sandbox) -- sh -c \(shq("test -e \(dir) || echo hidden"))").stdout, "hidden\n")
        let shown = dir + "/shown"
        try FileManager.default.createDirectory(atPath: shown, withIntermediateDirectories: true)
        try "shown read-only\n".write(toFile: shown + "/file", atomically: true, encoding: .utf8)
        let binds = sh("\(sandbox) --ro-bind \(shq(shown)):/shown --bind \(shq(out)):/results -- sh -c "
            + "'cp /shown/file /results/copy && ! touch /shown/new 2>/dev/null'")
        XCTAssertTrue(binds.ok, "\(binds)")
        XCTAssertEqual(try String(contentsOfFile: out + "/copy", encoding: .utf8), "shown read-only\n")
        XCTAssertFalse(FileManager.default.fileExists(atPath: shown + "/new"), "written through --ro-bind")
        let net = sh("\(sandbox) -- sh -c 'tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d \" \"'")
        XCTAssertEqual(net.stdout, "lo\n", "only loopback inside: \(net)")
        XCTAssertEqual(sh("\(sandbox) --chdir /cas/sha256 -- pwd").stdout, "/cas/sha256\n")
        XCTAssertTrue(sh("fusermount3 -u \(shq(mnt))").ok)
        let notMounted = sh("\(sandbox) -- true")
        XCTAssertFalse(notMounted.ok)
        XCTAssertTrue(notMounted.stderr.contains("not a casfs mount"), notMounted.stderr)
        XCTAssertEqual(notMounted.stderr.split(separator: "\n").count, 1, notMounted.stderr)
    }

    /// One zero-config mount per data directory; `casfs put` alongside a mount
    /// uses the mount's private Redis and leaves it running.
    func testZeroConfigStoreIsSharedSafely() throws {
        let env = "XDG_DATA_HOME=\(shq(dir + "/xdg"))"
        let second = dir + "/mnt2"
        try FileManager.default.createDirectory(atPath: second, withIntermediateDirectories: true)
        defer { if isFuseMounted(second) { runShell("fusermount3 -uz \(shq(second))") } }
        XCTAssertTrue(sh("\(env) \(shq(casfs)) mount \(shq(mnt))").ok)
        let again = sh("\(env) \(shq(casfs)) mount \(shq(second))")
        XCTAssertFalse(again.ok)
        XCTAssertEqual(again.stderr.split(separator: "\n").count, 1, again.stderr)
        XCTAssertTrue(again.stderr.contains("another casfs mount"), again.stderr)
        XCTAssertFalse(isFuseMounted(second))

        try "shared\n".write(toFile: dir + "/shared", atomically: true, encoding: .utf8)
        let put = sh("\(env) \(shq(casfs)) put \(shq(dir + "/shared"))")
        XCTAssertTrue(put.ok, "\(put)")
        let d = Digest.of(Data("shared\n".utf8))
        XCTAssertEqual(sh("cat \(shq(mnt))/sha256/\(d)").stdout, "shared\n", "the mount still has its Redis after put")
        XCTAssertTrue(sh("fusermount3 -u \(shq(mnt))").ok)
    }
}
