import CASCore
import Foundation
import TestSupport
import XCTest

/// `casfs run`: a command in a bubblewrap sandbox on an input root read from
/// `<mount>/tree/<digest>`, against real mounts, Redis and bwrap.
final class RunTests: MountTestCase {
    var casfs = ""
    /// TMPDIR of the runs: casfs run's temporary directories go here, so a
    /// test can see that none is left.
    var runTmp: String { tmp + "/runtmp" }
    var xdg: String { tmp + "/xdg" }

    override func setUpWithError() throws {
        try super.setUpWithError()
        casfs = try casfsBinary()
        guard sh("command -v bwrap").ok else { throw MountError("bubblewrap is not installed (apt-get install bubblewrap)") }
        guard sh("command -v python3").ok else { throw MountError("python3 is not installed: the input roots are encoded with it") }
        try FileManager.default.createDirectory(atPath: runTmp, withIntermediateDirectories: true)
    }

    override func tearDown() {
        // A zero-config mount a test left behind (it also stops its private Redis).
        if let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) {
            for line in info.split(separator: "\n") {
                let f = line.split(separator: " ")
                if f.count > 4, f[4].hasPrefix(tmp) { runShell("fusermount3 -u \(f[4]) || fusermount3 -uz \(f[4])") }
            }
        }
        super.tearDown()
    }

    /// `casfs run ARGS` from the test's directory, with TMPDIR and XDG_DATA_HOME of this test.
    func run(_ args: String, env: String = "") -> ShellResult {
        sh("cd \(shq(tmp)) && TMPDIR=\(shq(runTmp)) XDG_DATA_HOME=\(shq(xdg)) \(env) \(shq(casfs)) run \(args)")
    }

    // MARK: input roots

    /// REAPI Directory messages encoded by hand (protobuf wire format), standard library only.
    static let encoder = #"""
        import hashlib, os, stat, sys

        def varint(n):
            out = bytearray()
            while True:
                b = n & 0x7F
                n >>= 7
                if n:
                    out.append(b | 0x80)
                else:
                    out.append(b)
                    return bytes(out)

        def ld(num, payload):  # a length-delimited field
            return varint(num << 3 | 2) + varint(len(payload)) + payload

        def digest(h, size):  # Digest{hash=1, size_bytes=2}; defaults omitted
            m = ld(1, h.encode())
            if size:
                m += varint(2 << 3) + varint(size)
            return m

        def store(data):
            h = hashlib.sha256(data).hexdigest()
            with open(os.path.join(out, "%s_%d" % (h, len(data))), "wb") as f:
                f.write(data)
            return h, len(data)

        def encode(path):
            # Directory{files=1 FileNode, directories=2 DirectoryNode, symlinks=3 SymlinkNode}, sorted by name.
            files, dirs, links = [], [], []
            for name in sorted(os.listdir(path), key=lambda n: n.encode()):
                p = os.path.join(path, name)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    links.append(ld(1, name.encode()) + ld(2, os.readlink(p).encode()))
                elif stat.S_ISDIR(st.st_mode):
                    dirs.append(ld(1, name.encode()) + ld(2, digest(*encode(p))))
                else:
                    with open(p, "rb") as f:
                        node = ld(1, name.encode()) + ld(2, digest(*store(f.read())))
                    if st.st_mode & 0o100:
                        node += varint(4 << 3) + varint(1)  # is_executable=4
                    files.append(node)
            msg = b"".join(ld(1, n) for n in files) + b"".join(ld(2, n) for n in dirs) + b"".join(ld(3, n) for n in links)
            return store(msg)

        src, out = sys.argv[1], sys.argv[2]
        os.makedirs(out, exist_ok=True)
        print("%s_%d" % encode(src))
        """#

    /// The script of the input root: reads inputs (one in a subdirectory,
    /// one through a symlink), writes the output, exits with $1.
    static let script = """
        #!/bin/sh
        set -e
        cat greeting.txt sub/data.txt linked > "$CASFS_OUTPUT/result"
        echo "cwd=$(pwd) input=$CASFS_INPUT_ROOT output=$CASFS_OUTPUT" >> "$CASFS_OUTPUT/result"
        exit "${1:-0}"

        """

    /// A local directory encoded as an input root: returns the root digest
    /// and the directory holding every blob as `<hash>_<size>`.
    func encodeInputRoot(name: String = "root") throws -> (root: Digest, blobs: String) {
        let src = "\(tmp)/\(name)"
        try FileManager.default.createDirectory(atPath: src + "/sub/deeper", withIntermediateDirectories: true)
        try "hello from the input root\n".write(toFile: src + "/greeting.txt", atomically: true, encoding: .utf8)
        try "data in a subdirectory\n".write(toFile: src + "/sub/data.txt", atomically: true, encoding: .utf8)
        try "deeper still\n".write(toFile: src + "/sub/deeper/more.txt", atomically: true, encoding: .utf8)
        try Self.script.write(toFile: src + "/build.sh", atomically: true, encoding: .utf8)
        chmod(src + "/build.sh", 0o755)
        try FileManager.default.createSymbolicLink(atPath: src + "/linked", withDestinationPath: "sub/deeper/more.txt")
        let encoder = tmp + "/reapi_tree.py"
        try Self.encoder.write(toFile: encoder, atomically: true, encoding: .utf8)
        let blobs = "\(tmp)/\(name)-blobs"
        let out = mustSh("python3 \(shq(encoder)) \(shq(src)) \(shq(blobs))")
        let root = try XCTUnwrap(Digest(parsing: out.trimmingCharacters(in: .whitespacesAndNewlines)), out)
        return (root, blobs)
    }

    /// A writable mount holding an input root (copied in through /sha256).
    func mountWithInputRoot() throws -> (CasfsMount, Digest) {
        let (root, blobs) = try encodeInputRoot()
        let m = try mount(try cachedIndexedConfig())
        mustSh("cp \(shq(blobs))/* \(shq(m.sha256))/")
        XCTAssertTrue(sh("test -d \(shq(m.mountpoint))/tree/\(root)").ok, "the input root is not a directory of the mount")
        return (m, root)
    }

    let expected = "hello from the input root\ndata in a subdirectory\ndeeper still\ncwd=/input input=/input output=/out\n"

    func assertNothingLeft(_ what: String, file: StaticString = #filePath, line: UInt = #line) {
        let left = (try? FileManager.default.contentsOfDirectory(atPath: runTmp)) ?? ["(cannot list)"]
        XCTAssertEqual(left, [], "\(what): left in TMPDIR", file: file, line: line)
        let info = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        XCTAssertFalse(info.contains(runTmp), "\(what): a mount is left under \(runTmp)", file: file, line: line)
    }

    /// Exactly one line on stderr, naming `needle`, a non-zero status, nothing left behind.
    func assertOneLineError(_ r: ShellResult, _ needle: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(r.status, 125, "\(r)", file: file, line: line)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr, file: file, line: line)
        XCTAssertTrue(r.stderr.hasPrefix("casfs: "), r.stderr, file: file, line: line)
        XCTAssertTrue(r.stderr.contains(needle), "expected '\(needle)' in: \(r.stderr)", file: file, line: line)
        XCTAssertEqual(r.stdout, "", file: file, line: line)
        assertNothingLeft(needle, file: file, line: line)
    }

    // MARK: tests

    /// An executable script of the input root reads inputs and writes the
    /// output; the command's status is casfs run's.
    func testRunsScriptFromInputRoot() throws {
        let (m, root) = try mountWithInputRoot()
        let out = tmp + "/out/nested"
        let ok = run("--mount \(shq(m.mountpoint)) --input-root \(root) --output \(shq(out)) -- ./build.sh")
        XCTAssertEqual(ok.status, 0, "\(ok)")
        XCTAssertEqual(try String(contentsOfFile: out + "/result", encoding: .utf8), expected)

        try FileManager.default.removeItem(atPath: out + "/result")
        let three = run("--mount \(shq(m.mountpoint)) --input-root \(root) --output \(shq(out)) -- ./build.sh 3")
        XCTAssertEqual(three.status, 3, "\(three)")
        XCTAssertEqual(three.stderr, "", "the command's status is not an error of casfs run")
        XCTAssertEqual(try String(contentsOfFile: out + "/result", encoding: .utf8), expected)

        // A command killed by a signal: 128 + the signal.
        let killed = run("--mount \(shq(m.mountpoint)) --input-root \(root) -- sh -c 'kill -TERM $$'")
        XCTAssertEqual(killed.status, 128 + SIGTERM, "\(killed)")

        // Stdout passes through; the scratch output is writable and removed afterwards;
        // --writable-dir is writable at its own path.
        let shared = tmp + "/shared"
        let scratch = run("--mount \(shq(m.mountpoint)) --input-root \(root) --writable-dir \(shq(shared)) -- sh -c "
            + shq("./build.sh && cat $CASFS_OUTPUT/result && ls -ld /cas/sha256 >/dev/null && cp sub/data.txt \(shared)/copy && echo $PWD"))
        XCTAssertEqual(scratch.status, 0, "\(scratch)")
        XCTAssertEqual(scratch.stdout, expected + "/input\n")
        XCTAssertEqual(try String(contentsOfFile: shared + "/copy", encoding: .utf8), "data in a subdirectory\n")
        assertNothingLeft("scratch output")
        XCTAssertTrue(isFuseMounted(m.mountpoint), "a given mount stays mounted")
    }

    /// The input root is read-only inside; the store is unchanged.
    func testInputRootIsReadOnly() throws {
        let (m, root) = try mountWithInputRoot()
        let before = mustSh("ls \(shq(m.sha256))")
        for attempt in ["echo x > greeting.txt", "echo x > new.txt", "mkdir made", "rm greeting.txt",
                        "echo x >> sub/data.txt", "echo x > /cas/sha256/\(Digest.of(Data("x\n".utf8)))"] {
            let r = run("--mount \(shq(m.mountpoint)) --input-root \(root) -- sh -c \(shq(attempt))")
            XCTAssertNotEqual(r.status, 0, "\(attempt) succeeded inside")
            XCTAssertTrue(r.stderr.contains("Read-only file system"), "\(attempt): \(r.stderr)")
        }
        XCTAssertEqual(mustSh("ls \(shq(m.sha256))"), before)
        XCTAssertEqual(mustSh("cat \(shq(m.mountpoint))/tree/\(root)/greeting.txt"), "hello from the input root\n")
        XCTAssertEqual(mustSh("ls \(shq(m.mountpoint))/tree/\(root)"), "build.sh\ngreeting.txt\nlinked\nsub\n")
        // The files keep their modes: executable 0555, others 0444.
        let modes = run("--mount \(shq(m.mountpoint)) --input-root \(root) -- stat -c '%a %n' build.sh greeting.txt")
        XCTAssertEqual(modes.stdout, "555 build.sh\n444 greeting.txt\n", "\(modes)")
    }

    /// Only loopback inside, unless --network.
    func testNoNetworkUnlessAsked() throws {
        let (m, root) = try mountWithInputRoot()
        let list = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort"
        let closed = run("--mount \(shq(m.mountpoint)) --input-root \(root) -- sh -c \(shq(list))")
        XCTAssertEqual(closed.status, 0, "\(closed)")
        XCTAssertEqual(closed.stdout, "lo\n")
        let open = run("--network --mount \(shq(m.mountpoint)) --input-root \(root) -- sh -c \(shq(list))")
        XCTAssertEqual(open.status, 0, "\(open)")
        XCTAssertEqual(open.stdout, mustSh(list), "--network shares the host's interfaces")
    }

    /// Without --mount, the zero-config store is mounted read-only for the run
    /// and taken down afterwards: no mount, no private Redis, no temp dir.
    func testZeroConfigStoreIsMountedForTheRun() throws {
        let (root, blobs) = try encodeInputRoot()
        // Stored with `casfs put` of each blob: no mount involved.
        mustSh("XDG_DATA_HOME=\(shq(xdg)) \(shq(casfs)) put \(shq(blobs))/*")
        let redisPidFile = xdg + "/casfs/redis/redis.pid"
        let out = tmp + "/out"
        let show = "./build.sh && cat \(redisPidFile) && grep -c ' /cas .* - fuse' /proc/self/mountinfo && ls \(runTmp)"
        let r = run("--input-root \(root) --output \(shq(out)) -- sh -c \(shq(show))")
        XCTAssertEqual(r.status, 0, "\(r)")
        let lines = r.stdout.split(separator: "\n")
        XCTAssertEqual(lines.count, 3, "\(r)")
        let redisPid = try XCTUnwrap(lines.first.flatMap { Int32($0) }, "\(r)")
        XCTAssertEqual(lines.dropFirst().first, "1", "/cas is a FUSE mount")
        XCTAssertTrue(lines.last?.hasPrefix("casfs-run-") ?? false, "the temporary mount point is in TMPDIR: \(r)")
        XCTAssertEqual(try String(contentsOfFile: out + "/result", encoding: .utf8), expected)
        XCTAssertTrue(pollUntil(10) { kill(redisPid, 0) != 0 }, "the private Redis still runs after the run")
        assertNothingLeft("zero-config run")

        // A failing command, then SIGTERM to casfs run itself: taken down all the same.
        XCTAssertEqual(run("--input-root \(root) -- ./build.sh 7").status, 7)
        assertNothingLeft("failed run")
        let term = sh("""
            cd \(shq(tmp)) || exit 99
            export TMPDIR=\(shq(runTmp)) XDG_DATA_HOME=\(shq(xdg))
            \(shq(casfs)) run --input-root \(root) --writable-dir \(shq(tmp + "/flag")) -- sh -c 'touch \(tmp)/flag/up; sleep 60' &
            pid=$!
            for i in $(seq 300); do [ -e \(shq(tmp + "/flag/up")) ] && break; sleep 0.1; done
            kill -TERM $pid
            wait $pid
            """)
        XCTAssertTrue(FileManager.default.fileExists(atPath: tmp + "/flag/up"), "the command never started: \(term)")
        XCTAssertEqual(term.status, 128 + SIGTERM, "\(term)")
        XCTAssertTrue(pollUntil(10) { !self.sh("pgrep -f -- \(shq(self.xdg))").ok }, "a process of the store still runs")
        assertNothingLeft("run stopped by SIGTERM")
    }

    /// --config: that store is mounted read-only for the run.
    func testConfigStoreIsMountedForTheRun() throws {
        let (root, blobs) = try encodeInputRoot()
        for name in try FileManager.default.contentsOfDirectory(atPath: blobs) {
            _ = try placeInDiskStore(try Data(contentsOf: URL(fileURLWithPath: blobs + "/" + name)))
        }
        let config = tmp + "/run.yaml"
        try cachedDiskConfig().write(toFile: config, atomically: true, encoding: .utf8)
        let r = run("--config \(shq(config)) --input-root \(root) -- sh -c './build.sh && cat $CASFS_OUTPUT/result'")
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.stdout, expected)
        assertNothingLeft("--config run")
    }

    /// A running zero-config mount is used as it is; while only a temporary
    /// mount of another run serves the store, the error says to pass --mount.
    func testRunningZeroConfigMountIsUsed() throws {
        let (root, blobs) = try encodeInputRoot()
        let mp = tmp + "/zc"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        mustSh("XDG_DATA_HOME=\(shq(xdg)) \(shq(casfs)) mount \(shq(mp))")
        mustSh("cp \(shq(blobs))/* \(shq(mp))/sha256/")
        let out = tmp + "/out"
        // Nothing is created in TMPDIR: no temporary mount, no scratch output.
        let r = run("--input-root \(root) --output \(shq(out)) -- sh -c \(shq("./build.sh && ls -A \(runTmp) && echo listed"))")
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.stdout, "listed\n")
        XCTAssertEqual(try String(contentsOfFile: out + "/result", encoding: .utf8), expected)
        XCTAssertTrue(isFuseMounted(mp), "the standing mount stays")
        mustSh("fusermount3 -u \(shq(mp))")
        XCTAssertTrue(pollUntil(10) { !self.sh("pgrep -f -- \(shq(self.xdg))").ok }, "the mount's Redis still runs")

        // Another run's temporary mount holds the store: a second run is told to pass --mount.
        let flag = tmp + "/flag"
        let both = sh("""
            cd \(shq(tmp)) || exit 99
            export TMPDIR=\(shq(runTmp)) XDG_DATA_HOME=\(shq(xdg))
            \(shq(casfs)) run --input-root \(root) --writable-dir \(shq(flag)) -- sh -c 'touch \(flag)/up; sleep 60' &
            pid=$!
            for i in $(seq 300); do [ -e \(shq(flag + "/up")) ] && break; sleep 0.1; done
            \(shq(casfs)) run --input-root \(root) -- true
            echo "second=$?"
            kill -INT $pid
            wait $pid
            """)
        XCTAssertEqual(both.status, 128 + SIGINT, "\(both)")
        XCTAssertTrue(both.stdout.contains("second=125"), "\(both)")
        XCTAssertEqual(both.stderr.split(separator: "\n").count, 1, both.stderr)
        XCTAssertTrue(both.stderr.contains("pass --mount"), both.stderr)
        XCTAssertTrue(pollUntil(10) { !self.sh("pgrep -f -- \(shq(self.xdg))").ok }, "a process of the store still runs")
        assertNothingLeft("concurrent runs")
    }

    /// Each error is one line, exits 125 and leaves nothing behind.
    func testErrorsAreOneLine() throws {
        let (m, root) = try mountWithInputRoot()
        let mp = shq(m.mountpoint)
        let neverOut = tmp + "/never-created"
        let o = "--output \(shq(neverOut))"
        assertOneLineError(run("--mount \(mp) --input-root \(root) \(o)"), "no command given")
        assertOneLineError(run("--mount \(mp) --input-root \(root) \(o) --"), "no command given")
        assertOneLineError(run("--mount \(mp) --input-root \(root.hash.uppercased())_\(root.size) \(o) -- true"), "is not a digest")
        assertOneLineError(run("--mount \(mp) --input-root \(root.hash) \(o) -- true"), "is not a digest")
        assertOneLineError(run("--mount \(shq(tmp)) --input-root \(root) \(o) -- true"), "is not a casfs mount")
        let absent = Digest.of(Data("no such directory".utf8))
        assertOneLineError(run("--mount \(mp) --input-root \(absent) \(o) -- true"), "is not in the store")
        let plain = Digest.of(Data("hello from the input root\n".utf8))
        assertOneLineError(run("--mount \(mp) --input-root \(plain) \(o) -- true"), "is not a REAPI Directory")
        assertOneLineError(run("--mount \(mp) --input-root \(root) \(o) -- true", env: "PATH=/nonexistent"), "bubblewrap")
        assertOneLineError(run("--mount \(mp) --config \(shq(m.configPath)) --input-root \(root) \(o) -- true"), "exclude")
        assertOneLineError(run("--mount \(mp) --input-root \(root) --writable-dir /out/x \(o) -- true"), "--writable-dir")
        // The same without --mount: the temporary mount is taken down again.
        mustSh("XDG_DATA_HOME=\(shq(xdg)) \(shq(casfs)) put \(shq(tmp))/root-blobs/*")
        assertOneLineError(run("--input-root \(absent) \(o) -- true"), "is not in the store")
        assertOneLineError(run("--input-root \(plain) \(o) -- true"), "is not a REAPI Directory")
        XCTAssertFalse(FileManager.default.fileExists(atPath: neverOut), "--output was created for a failed run")
        XCTAssertTrue(pollUntil(10) { !self.sh("pgrep -f -- \(shq(self.xdg))").ok }, "a process of the store still runs")
    }
}
