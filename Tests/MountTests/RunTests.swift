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
            // EACCES where the mode forbids the write before the read-only mount is consulted.
            XCTAssertTrue(r.stderr.contains("Read-only file system") || r.stderr.contains("Permission denied"),
                          "\(attempt): \(r.stderr)")
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
        let host = mustSh(list)
        XCTAssertTrue(host.split(separator: "\n").contains { $0 != "lo" }, "the host has no interface but lo: --network cannot be told apart")
        XCTAssertEqual(open.stdout, host, "--network shares the host's interfaces")
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
        // The sandbox sees host paths only when they are bound in.
        let seen = "--ro-bind \(shq(xdg)) --ro-bind \(shq(runTmp))"
        let r = run("--input-root \(root) --output \(shq(out)) \(seen) -- sh -c \(shq(show))")
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
        let r = run("--input-root \(root) --output \(shq(out)) --ro-bind \(shq(runTmp)) -- sh -c \(shq("./build.sh && ls -A \(runTmp) && echo listed"))")
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

    // MARK: least privilege

    /// The capability sets and no_new_privs of the process inside.
    func testCommandHasNoCapabilities() throws {
        let (m, root) = try mountWithInputRoot()
        let fields = "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status"
        // The test runs as root with capabilities: else this would prove nothing.
        XCTAssertEqual(getuid(), 0, "the sandbox tests run as root")
        XCTAssertFalse(mustSh(fields).contains("CapEff:\t0000000000000000"), "the host process has no capabilities to lose")
        let r = run("--mount \(shq(m.mountpoint)) --input-root \(root) -- \(fields)")
        XCTAssertEqual(r.status, 0, "\(r)")
        let zero = "0000000000000000"
        XCTAssertEqual(r.stdout, "CapInh:\t\(zero)\nCapPrm:\t\(zero)\nCapEff:\t\(zero)\nCapBnd:\t\(zero)\nCapAmb:\t\(zero)\nNoNewPrivs:\t1\n")
        // Same uid as the caller, without its power.
        XCTAssertEqual(run("--mount \(shq(m.mountpoint)) -- id -u").stdout, "0\n")
    }

    /// Nothing can be remounted writable, also not from a new user or mount
    /// namespace; the host file behind a read-only bind stays as it was.
    func testCannotRemountOrRegainCapabilities() throws {
        let (m, root) = try mountWithInputRoot()
        let data = tmp + "/hostdata"
        try FileManager.default.createDirectory(atPath: data, withIntermediateDirectories: true)
        try "host\n".write(toFile: data + "/file", atomically: true, encoding: .utf8)
        let write = "echo changed > /data/file"
        let attempts = [
            "mount -o remount,rw /",
            "mount -o remount,rw /usr",
            "mount -o remount,bind,rw /usr",
            "mount -o remount,bind,rw /data && \(write)",
            "mount -o remount,bind,rw /cas",
            "umount /data && \(write)",
            "mount --bind /tmp /data && \(write)",
            "unshare -r sh -c \(shq("mount -o remount,bind,rw /data && \(write)"))",
            "unshare -m sh -c \(shq("mount -o remount,bind,rw /data && \(write)"))",
            "unshare -U sh -c \(shq("unshare -m mount -o remount,bind,rw /data && \(write)"))",
            "unshare -Urm sh -c \(shq("umount -l /data; \(write)"))",
        ]
        for attempt in attempts {
            let r = run("--mount \(shq(m.mountpoint)) --input-root \(root) --ro-bind \(shq(data)):/data -- sh -c "
                + shq("\(attempt); s=$?; grep ' /data ' /proc/self/mountinfo; exit $s"))
            XCTAssertNotEqual(r.status, 0, "succeeded inside: \(attempt): \(r)")
            XCTAssertTrue(r.stdout.contains(" ro,") || r.stdout.contains(" ro "), "/data is not read-only after \(attempt): \(r)")
            XCTAssertEqual(try String(contentsOfFile: data + "/file", encoding: .utf8), "host\n", "the host file changed: \(attempt)")
        }
        // The same write does change the file through --bind: the attempts could have shown a change.
        let rw = run("--mount \(shq(m.mountpoint)) --bind \(shq(data)):/data -- sh -c \(shq(write))")
        XCTAssertEqual(rw.status, 0, "\(rw)")
        XCTAssertEqual(try String(contentsOfFile: data + "/file", encoding: .utf8), "changed\n")
    }

    /// Connects to the unix socket argv[1], sends argv[2] if given, prints
    /// the first line of the reply.
    static let connect = #"""
        import socket, sys
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(sys.argv[1])
        if len(sys.argv) > 2:
            s.sendall(sys.argv[2].encode() + b"\r\n")
        print(s.recv(100).decode().splitlines()[0])
        """#

    /// Shell text that reports whether `path` exists inside and whether a
    /// connect to it succeeds (with /usr/bin/python3, the system's).
    func probeSocket(_ path: String, send: String? = nil) -> String {
        let message = send.map { " " + shq($0) } ?? ""
        return "if [ -e \(shq(path)) ]; then echo exists; else echo absent; fi; "
            + "/usr/bin/python3 -c \(shq(Self.connect)) \(shq(path))\(message) && echo connected || echo refused"
    }

    /// A unix socket listening on the host under /var/tmp is neither visible
    /// nor reachable inside, with or without --network; bound in, it is.
    func testHostUnixSocketIsNotReachable() throws {
        let (m, root) = try mountWithInputRoot()
        XCTAssertTrue(tmp.hasPrefix("/var/tmp/"), "the test directory is not under /var/tmp: \(tmp)")
        let dir = tmp + "/sockets"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let socket = dir + "/host.sock"
        let server = try startLoggedProcess("/usr/bin/python3", ["-c", """
            import socket, sys
            s = socket.socket(socket.AF_UNIX)
            s.bind(sys.argv[1])
            s.listen(8)
            while True:
                c, _ = s.accept()
                c.sendall(b"hello from the host\\n")
                c.close()
            """, socket], log: tmp + "/socket-server.log")
        defer { server.terminate(); server.waitUntilExit() }
        XCTAssertTrue(pollUntil(20) { self.sh("test -S \(shq(socket))").ok }, "the host socket never appeared")
        XCTAssertEqual(mustSh(probeSocket(socket)), "exists\nhello from the host\nconnected\n", "the host itself cannot connect")

        for network in ["", "--network "] {
            let r = run("\(network)--mount \(shq(m.mountpoint)) --input-root \(root) -- sh -c \(shq(probeSocket(socket)))")
            XCTAssertEqual(r.status, 0, "\(r)")
            XCTAssertEqual(r.stdout, "absent\nrefused\n", "\(network)reached the host socket: \(r)")
        }
        // A read-only bind does not stop connect(): that is why nothing is shown unasked.
        let bound = run("--mount \(shq(m.mountpoint)) --ro-bind \(shq(dir)):/sockets -- sh -c \(shq(probeSocket("/sockets/host.sock")))")
        XCTAssertEqual(bound.stdout, "exists\nhello from the host\nconnected\n", "\(bound)")
    }

    /// The private Redis of a running zero-config mount (its socket in the
    /// data directory) is out of reach of a run on that mount.
    func testZeroConfigRedisSocketIsNotVisible() throws {
        let mp = tmp + "/zc"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        mustSh("XDG_DATA_HOME=\(shq(xdg)) \(shq(casfs)) mount \(shq(mp))")
        let redisDir = xdg + "/casfs/redis"
        let socket = redisDir + "/redis.sock"
        XCTAssertTrue(sh("test -S \(shq(socket))").ok, "the zero-config mount has no Redis socket at \(socket)")
        XCTAssertEqual(mustSh(probeSocket(socket, send: "PING")), "exists\n+PONG\nconnected\n", "the host cannot reach its Redis")

        for network in ["", "--network "] {
            // No --mount: the running zero-config mount is the one used.
            let r = run("\(network)-- sh -c \(shq("grep -c ' /cas .* - fuse' /proc/self/mountinfo; [ -e \(shq(xdg)) ] && echo data-visible; " + probeSocket(socket, send: "PING")))")
            XCTAssertEqual(r.status, 0, "\(r)")
            XCTAssertEqual(r.stdout, "1\nabsent\nrefused\n", "\(network)reached the mount's Redis: \(r)")
        }
        let bound = run("--ro-bind \(shq(redisDir)):/redis -- sh -c \(shq(probeSocket("/redis/redis.sock", send: "PING")))")
        XCTAssertEqual(bound.stdout, "exists\n+PONG\nconnected\n", "\(bound)")
        mustSh("fusermount3 -u \(shq(mp))")
        XCTAssertTrue(pollUntil(10) { !self.sh("pgrep -f -- \(shq(self.xdg))").ok }, "the mount's Redis still runs")
    }

    /// The root holds exactly the system, the sandbox's own paths and
    /// nothing else of the host.
    func testSandboxSeesOnlyTheSystem() throws {
        let (m, root) = try mountWithInputRoot()
        let mp = shq(m.mountpoint)
        var expected: Set<String> = ["usr", "etc", "dev", "proc", "tmp", "cas", "input", "out"]
        for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] where sh("test -e /\(name) || test -L /\(name)").ok {
            expected.insert(name)
        }
        for hostDir in ["/run", "/var", "/home", "/root"] {
            XCTAssertTrue(sh("test -d \(hostDir)").ok, "the host has no \(hostDir): the test cannot show it is hidden")
        }
        let top = run("--mount \(mp) --input-root \(root) -- ls -A /")
        XCTAssertEqual(top.status, 0, "\(top)")
        XCTAssertEqual(Set(top.stdout.split(separator: "\n").map(String.init)), expected, "\(top)")
        let hidden = ["/run", "/var", "/home", "/root", "/srv", "/mnt", "/opt", "/media", "/sys", "/boot", tmp, xdg, "/dev/fuse"]
        let look = hidden.map { "[ -e \(shq($0)) ] && echo \(shq($0))" }.joined(separator: "; ") + "; true"
        XCTAssertEqual(run("--mount \(mp) -- sh -c \(shq(look))").stdout, "", "host paths visible inside")

        // The system's programs work; /etc without what only root may read.
        let sum = run("--mount \(mp) -- sh -c 'printf abc | /usr/bin/sha256sum'")
        XCTAssertEqual(sum.stdout, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  -\n", "\(sum)")
        XCTAssertTrue(run("--mount \(mp) -- grep -q '^root:' /etc/passwd").ok)
        XCTAssertTrue(FileManager.default.isReadableFile(atPath: "/etc/shadow"), "the host's root cannot read /etc/shadow")
        let shadow = run("--mount \(mp) -- cat /etc/shadow")
        XCTAssertNotEqual(shadow.status, 0, "/etc/shadow is readable inside: \(shadow)")
        XCTAssertEqual(shadow.stdout, "")

        // A private, writable /tmp: the host's is not seen, nothing written reaches it.
        let name = "casfs-run-test-\(UUID().uuidString)"
        FileManager.default.createFile(atPath: "/tmp/\(name)-host", contents: Data())
        defer { unlink("/tmp/\(name)-host") }
        let t = run("--mount \(mp) -- sh -c \(shq("ls -A /tmp; echo inside > /tmp/\(name) && cat /tmp/\(name)"))")
        XCTAssertEqual(t.status, 0, "\(t)")
        XCTAssertEqual(t.stdout, "inside\n")
        XCTAssertFalse(FileManager.default.fileExists(atPath: "/tmp/\(name)"), "a file of the sandbox's /tmp is on the host")

        // /proc shows the sandbox's processes only: bwrap's init, the shell, and what it runs.
        let procs = run("--mount \(mp) -- sh -c 'for p in /proc/[0-9]*; do cat $p/comm; done'")
        XCTAssertEqual(procs.status, 0, "\(procs)")
        let names = procs.stdout.split(separator: "\n").map(String.init)
        XCTAssertTrue(names.contains("bwrap") && names.contains("sh"), "\(procs)")
        XCTAssertTrue(Set(names).isSubset(of: ["bwrap", "sh", "cat"]), "other processes in /proc: \(procs)")
        XCTAssertTrue(names.count <= 4, "\(procs)")
    }

    /// --bind shows a host path writable, --ro-bind read-only, at the path
    /// given or at their own; bad binds are one-line errors.
    func testBindAndReadOnlyBind() throws {
        let (m, root) = try mountWithInputRoot()
        let mp = shq(m.mountpoint)
        let rw = tmp + "/rw", ro = tmp + "/ro"
        for d in [rw, ro] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        try "read me\n".write(toFile: ro + "/file", atomically: true, encoding: .utf8)

        let script = "echo made > /work/rw/made && cat /data/ro/file /data/ro-file && echo x > /data/ro/file"
        let r = run("--mount \(mp) --input-root \(root) --bind \(shq(rw)):/work/rw --ro-bind \(shq(ro)):/data/ro "
            + "--ro-bind \(shq(ro + "/file")):/data/ro-file -- sh -c \(shq(script))")
        XCTAssertNotEqual(r.status, 0, "a write through --ro-bind succeeded: \(r)")
        XCTAssertEqual(r.stdout, "read me\nread me\n", "\(r)")
        XCTAssertTrue(r.stderr.contains("Read-only file system"), r.stderr)
        XCTAssertEqual(try String(contentsOfFile: rw + "/made", encoding: .utf8), "made\n")
        XCTAssertEqual(try String(contentsOfFile: ro + "/file", encoding: .utf8), "read me\n")

        // Without :DST, at the host path; a bind nested in another, whatever the order given.
        let same = run("--mount \(mp) --ro-bind \(shq(ro)):\(shq(rw))/inner --bind \(shq(rw)) -- sh -c "
            + shq("cat \(rw)/made \(rw)/inner/file && echo again > \(rw)/made"))
        XCTAssertEqual(same.status, 0, "\(same)")
        XCTAssertEqual(same.stdout, "made\nread me\n")
        XCTAssertEqual(try String(contentsOfFile: rw + "/made", encoding: .utf8), "again\n")
        try? FileManager.default.removeItem(atPath: rw + "/inner")

        let o = "--mount \(mp) --output \(shq(tmp + "/never-created"))"
        assertOneLineError(run("\(o) --bind \(shq(tmp + "/absent")) -- true"), "--bind")
        assertOneLineError(run("\(o) --ro-bind \(shq(ro)):relative -- true"), "not absolute")
        assertOneLineError(run("\(o) --bind \(shq(rw)):/out/x -- true"), "would hide")
        assertOneLineError(run("\(o) --ro-bind \(shq(ro)):/x/../cas -- true"), "..")
        assertOneLineError(run("\(o) --ro-bind \(shq(ro)):/ -- true"), "would hide")
        assertOneLineError(run("\(o) --ro-bind \(shq(ro)):/x --bind \(shq(rw)):/x/ -- true"), "two binds at /x")
        XCTAssertFalse(FileManager.default.fileExists(atPath: tmp + "/never-created"))
    }

    /// Where bwrap may not create the namespaces, the command does not run
    /// and casfs run exits 125 with one line.
    func testFailsClosedWithoutNamespaces() throws {
        let (m, root) = try mountWithInputRoot()
        let out = tmp + "/closed-out"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        // A user namespace that allows no further user namespace.
        let inside = "echo 0 > /proc/sys/user/max_user_namespaces && ! unshare -U true 2>/dev/null || exit 99; "
            + "exec env TMPDIR=\(shq(runTmp)) \(shq(casfs)) run --mount \(shq(m.mountpoint)) --input-root \(root) "
            + "--output \(shq(out)) -- touch /out/ran"
        let r = sh("unshare -U -r sh -c \(shq(inside))")
        XCTAssertNotEqual(r.status, 99, "cannot forbid user namespaces for the test: \(r)")
        XCTAssertEqual(r.status, 125, "\(r)")
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.hasPrefix("casfs: cannot set up the sandbox"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out + "/ran"), "the command ran")
        // The same run, allowed its namespaces, runs the command.
        let ok = run("--mount \(shq(m.mountpoint)) --input-root \(root) --output \(shq(out)) -- touch /out/ran")
        XCTAssertEqual(ok.status, 0, "\(ok)")
        XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/ran"))
    }

    /// Descriptors the caller left open do not reach the command.
    func testOnlyStandardDescriptorsReachTheCommand() throws {
        let (m, _) = try mountWithInputRoot()
        let secret = tmp + "/hostdata-fd"
        try "behind a descriptor\n".write(toFile: secret, atomically: true, encoding: .utf8)
        let r = sh("cd \(shq(tmp)) && exec 7<\(shq(secret)) && TMPDIR=\(shq(runTmp)) \(shq(casfs)) run --mount \(shq(m.mountpoint)) -- sh -c 'ls /proc/self/fd; cat <&7'")
        XCTAssertTrue(sh("exec 7<\(shq(secret)) && cat <&7").stdout == "behind a descriptor\n", "the shell cannot pass descriptor 7")
        XCTAssertNotEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.stdout, "0\n1\n2\n3\n", "\(r)")  // 3: ls's own directory descriptor
        XCTAssertFalse(r.stdout.contains("behind a descriptor"))
    }

    // MARK: scratch

    /// An action that nests deeper than PATH_MAX in its scratch output: the
    /// scratch goes all the same.
    func testScratchDeeperThanPathMaxIsRemoved() throws {
        let (m, root) = try mountWithInputRoot()
        // 500 levels of 8-character names: 4,500 bytes of path below /out
        // (made with relative chdirs: no path that long can be named).
        let nest = """
            import os
            os.chdir("/out")
            for level in range(500):
                os.mkdir("aaaaaaaa")
                os.chdir("aaaaaaaa")
                if level == 250: os.chmod("..", 0o555)
            open("f", "w").write("deep")
            os.chmod(".", 0o500)
            """
        let r = run("--mount \(shq(m.mountpoint)) --input-root \(root) -- python3 -c \(shq(nest))")
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.stderr, "")
        assertNothingLeft("deep scratch")
    }

    /// A scratch that cannot be removed (here: a mount put inside it while
    /// the command ran) is a failed run, never exit 0 with a warning.
    func testAFailedCleanupIsAnErrorExit() throws {
        let (m, root) = try mountWithInputRoot()
        let flag = tmp + "/flag"
        let r = sh("""
            cd \(shq(tmp)) || exit 99
            export TMPDIR=\(shq(runTmp)) XDG_DATA_HOME=\(shq(xdg))
            \(shq(casfs)) run --mount \(shq(m.mountpoint)) --input-root \(root) --writable-dir \(shq(flag)) \
                -- sh -c 'mkdir /out/m && touch \(flag)/up && while [ ! -e \(flag)/go ]; do sleep 0.1; done' &
            pid=$!
            for i in $(seq 300); do [ -e \(shq(flag + "/up")) ] && break; sleep 0.1; done
            mount -t tmpfs none \(shq(runTmp))/casfs-run-*/out/m || echo "cannot mount"
            touch \(shq(flag + "/go"))
            wait $pid
            """)
        defer { _ = sh("umount \(shq(runTmp))/casfs-run-*/out/m") }
        XCTAssertEqual(r.status, 125, "\(r)")
        XCTAssertFalse(r.stdout.contains("cannot mount"), "\(r)")
        XCTAssertTrue(r.stderr.contains("left ") && r.stderr.contains("another filesystem"), r.stderr)
        // The next run (once the mount is gone) takes the leftover away.
        XCTAssertTrue(sh("umount \(shq(runTmp))/casfs-run-*/out/m").ok)
        XCTAssertEqual(run("--mount \(shq(m.mountpoint)) --input-root \(root) -- true").status, 0)
        assertNothingLeft("after a failed cleanup")
    }

    /// casfs run killed with SIGKILL (its sandbox dies with it): the
    /// scratch and the temporary mount it left go at the start of the next
    /// run, and the mount's daemon exits.
    func testLeftoversOfAKilledRunGoAtTheNextStart() throws {
        let (root, blobs) = try encodeInputRoot()
        mustSh("XDG_DATA_HOME=\(shq(xdg)) \(shq(casfs)) put \(shq(blobs))/*")
        let flag = tmp + "/flag"
        let marker = "\(Int.random(in: 100_000...999_999))"
        let killed = sh("""
            cd \(shq(tmp)) || exit 99
            export TMPDIR=\(shq(runTmp)) XDG_DATA_HOME=\(shq(xdg))
            \(shq(casfs)) run --input-root \(root) --writable-dir \(shq(flag)) -- sh -c 'echo x > /out/f; touch \(flag)/up; exec sleep 6\(marker)' &
            pid=$!
            for i in $(seq 300); do [ -e \(shq(flag + "/up")) ] && break; sleep 0.1; done
            kill -KILL $pid
            wait $pid
            """)
        XCTAssertEqual(killed.status, 128 + SIGKILL, "\(killed)")
        XCTAssertTrue(pollUntil(30) { !self.sh("pgrep -f 'sleep 6\(marker)'").ok }, "the sandbox outlived casfs run")
        let left = try FileManager.default.contentsOfDirectory(atPath: runTmp)
        XCTAssertEqual(left.count, 1, "\(left)")
        let scratch = runTmp + "/" + (left.first ?? "")
        XCTAssertTrue(FileManager.default.fileExists(atPath: scratch + "/out/f"))
        XCTAssertTrue(isFuseMounted(scratch + "/mnt"), "the temporary mount of the killed run")

        let r = run("--input-root \(root) -- ./build.sh")
        XCTAssertEqual(r.status, 0, "\(r)")
        XCTAssertEqual(r.stderr, "")
        assertNothingLeft("after a killed run")
        XCTAssertTrue(pollUntil(30) { !self.sh("pgrep -f -- \(shq(self.xdg))").ok }, "a process of the store still runs")
    }
}
