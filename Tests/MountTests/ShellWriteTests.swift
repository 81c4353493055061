import CASCore
import Foundation
import TestSupport
import XCTest

/// Writes as shells and tools make them: redirections, appends, groups,
/// truncation, mmap and fsync, judged by the name's digest at the last close.
final class ShellWriteTests: MountTestCase {
    /// Log lines of the daemon that name `d` at level error or warning.
    func complaints(_ log: String, _ d: Digest) -> [String] {
        log.split(separator: "\n").map(String.init).filter { $0.contains(d.hash) && ($0.contains(" error ") || $0.contains(" warning ")) }
    }

    func stored(_ d: Digest, _ m: ZeroConfigMount) -> Bool {
        FileManager.default.fileExists(atPath: diskObjectPath(root: m.dataDirectory, d))
            && m.redis("EXISTS A:\(d)").trimmingCharacters(in: .whitespacesAndNewlines) == "1"
    }

    func rejected(_ m: ZeroConfigMount) throws -> Int64 { try m.stats()["casfs_writes_rejected_total"] ?? -1 }

    func testRedirectionsGroupsAndAppends() throws {
        let m = try zeroConfigMount()
        let a = randomData(300_000, seed: 41), b = randomData(200_003, seed: 42)
        let (pa, da) = try localBlob(a, name: "a")
        let (pb, _) = try localBlob(b, name: "b")
        let dab = Digest.of(a + b)

        // `cat a > name`: stored, no complaint, nothing counted as rejected.
        let before = try rejected(m)
        mustSh("cat \(shq(pa)) > \(shq(m.path(da)))")
        XCTAssertTrue(stored(da, m))
        XCTAssertEqual(try rejected(m), before, "a correct redirection counted as rejected")
        XCTAssertEqual(complaints(m.log, da), [], "a correct redirection was logged as an error")
        // Again over the existing blob: the same.
        mustSh("cat \(shq(pa)) > \(shq(m.path(da)))")
        XCTAssertEqual(try rejected(m), before)
        XCTAssertEqual(complaints(m.log, da), [])

        // `{ cat a; cat b; } > name`: two processes write through one open file.
        let group = sh("{ cat \(shq(pa)); cat \(shq(pb)); } > \(shq(m.path(dab)))")
        XCTAssertTrue(group.ok, "\(group)")
        XCTAssertTrue(stored(dab, m))
        XCTAssertEqual(mustSh("cat \(shq(pa)) \(shq(pb)) | cmp - \(shq(m.path(dab))) && echo same"), "same\n")
        XCTAssertEqual(complaints(m.log, dab), [])
        // The same through a subshell and through exec'd descriptors.
        let c = randomData(70_000, seed: 43)
        let (pc, _) = try localBlob(c, name: "c")
        let dca = Digest.of(c + a)
        XCTAssertTrue(sh("( cat \(shq(pc)); cat \(shq(pa)) ) > \(shq(m.path(dca)))").ok)
        XCTAssertTrue(stored(dca, m))
        let dac = Digest.of(a + c)
        XCTAssertTrue(sh("exec 4> \(shq(m.path(dac))); cat \(shq(pa)) >&4; cat \(shq(pc)) >&4; exec 4>&-").ok)
        XCTAssertTrue(stored(dac, m))

        // `cat f >> name` onto a new name: appends from size 0.
        let f = randomData(123_456, seed: 44)
        let (pf, df) = try localBlob(f, name: "f")
        XCTAssertTrue(sh("cat \(shq(pf)) >> \(shq(m.path(df)))").ok)
        XCTAssertTrue(stored(df, m))
        XCTAssertEqual(mustSh("cmp \(shq(pf)) \(shq(m.path(df))) && echo same"), "same\n")
        // dd (O_CREAT, then ftruncate to 0) and tee onto new names.
        let t = randomData(333_333, seed: 48)
        let (pt, dt) = try localBlob(t, name: "t")
        mustSh("dd if=\(shq(pt)) of=\(shq(m.path(dt))) bs=64k status=none")
        XCTAssertTrue(stored(dt, m))
        let u = randomData(44_444, seed: 49)
        let (pu, du) = try localBlob(u, name: "u")
        mustSh("tee \(shq(m.path(du))) < \(shq(pu)) > /dev/null")
        XCTAssertTrue(stored(du, m))
        XCTAssertEqual(complaints(m.log, dt) + complaints(m.log, du), [])

        // `>>` onto an existing blob: refused, the blob unchanged.
        let app = sh("cat \(shq(pb)) >> \(shq(m.path(da)))")
        XCTAssertFalse(app.ok)
        XCTAssertTrue(app.stderr.contains("Operation not permitted") || app.stderr.contains("File too large"), app.stderr)
        XCTAssertEqual(mustSh("stat -c %s \(shq(m.path(da)))"), "\(da.size)\n")
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(da))) | cut -c1-64"), da.hash + "\n")
        XCTAssertEqual(mustSh("sha256sum < \(shq(diskObjectPath(root: m.dataDirectory, da))) | cut -c1-64"), da.hash + "\n")

        // `truncate -s 0` and `truncate -s N` of a blob: EPERM.
        for size in ["0", "10", "\(da.size + 1)"] {
            let t = sh("truncate -s \(size) \(shq(m.path(da)))")
            XCTAssertFalse(t.ok, "truncate -s \(size)")
            XCTAssertTrue(t.stderr.contains("Operation not permitted"), t.stderr)
        }
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(da))) | cut -c1-64"), da.hash + "\n")
        XCTAssertTrue(m.isRunning)
    }

    func testIncompleteAndWrongWritesFailAtClose() throws {
        let m = try zeroConfigMount()
        let f = randomData(64_000, seed: 45)
        let (pf, df) = try localBlob(f, name: "f")
        let before = try rejected(m)

        // `head -c 10 f > name`: EIO at close, nothing stored, one log line.
        let head = sh("head -c 10 \(shq(pf)) > \(shq(m.path(df)))")
        XCTAssertFalse(head.ok)
        XCTAssertTrue(head.stderr.contains("Input/output error"), head.stderr)
        XCTAssertFalse(stored(df, m))
        XCTAssertFalse(sh("stat \(shq(m.path(df)))").ok, "an incomplete write left a name")
        XCTAssertTrue(pollUntil(10) { self.complaints(m.log, df).count >= 1 })
        XCTAssertEqual(complaints(m.log, df).count, 1, complaints(m.log, df).joined(separator: "\n"))
        XCTAssertEqual(try rejected(m), before + 1)

        // A complete file with other bytes: EIO at close.
        var wrong = f
        wrong[100] ^= 1
        let (pw, _) = try localBlob(wrong, name: "wrong")
        let w = sh("cat \(shq(pw)) > \(shq(m.path(df)))")
        XCTAssertFalse(w.ok)
        XCTAssertTrue(w.stderr.contains("Input/output error"), w.stderr)
        XCTAssertFalse(stored(df, m))
        XCTAssertEqual(try rejected(m), before + 2)
        // And then the right bytes work.
        mustSh("cat \(shq(pf)) > \(shq(m.path(df)))")
        XCTAssertTrue(stored(df, m))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: m.dataDirectory + "/staging"), [])
    }

    /// A shared writable mapping of a new name: stored at close when the
    /// mapping works, else refused at mmap(); never accepted and dropped.
    func testSharedWritableMmapOfANewName() throws {
        let m = try zeroConfigMount()
        let data = randomData(200_000, seed: 46)
        let (src, d) = try localBlob(data)
        let py = """
            import mmap, os, sys
            path, src, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
            data = open(src, "rb").read()
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(fd, n)
            try:
                mm = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                print("mmap-failed", e.errno)
                try:
                    os.close(fd)
                except OSError as e2:
                    print("close", e2.errno)
                sys.exit(0)
            mm[:] = data
            mm.flush()
            mm.close()
            try:
                os.close(fd)
                print("closed 0")
            except OSError as e:
                print("close", e.errno)
            """
        let out = mustSh("python3 -c \(shq(py)) \(shq(m.path(d))) \(shq(src)) \(d.size)")
        let lines = out.split(separator: "\n").map(String.init)
        if lines.first == "closed 0" {
            XCTAssertTrue(stored(d, m), "mmap and close succeeded but nothing was stored")
            XCTAssertEqual(mustSh("cmp \(shq(src)) \(shq(m.path(d))) && echo same"), "same\n")
        } else {
            XCTAssertEqual(lines.first, "mmap-failed \(ENODEV)", out)
            XCTAssertFalse(stored(d, m))
            XCTAssertFalse(sh("stat \(shq(m.path(d)))").ok)
        }
        XCTAssertTrue(m.isRunning)
    }

    /// fsync of an incomplete write is EIO; after the whole content it is 0
    /// and the blob is stored before the file is closed.
    func testFsyncJudgesTheBytesWritten() throws {
        let m = try zeroConfigMount()
        let data = randomData(300_000, seed: 47)
        let (src, d) = try localBlob(data)
        let flag = tmp + "/fsynced"
        let py = """
            import os, sys, time
            path, src, flag = sys.argv[1], sys.argv[2], sys.argv[3]
            data = open(src, "rb").read()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data[:1000])
            try:
                os.fsync(fd)
                print("partial 0")
            except OSError as e:
                print("partial", e.errno)
            view = memoryview(data)[1000:]
            while view:
                n = os.write(fd, view)
                view = view[n:]
            try:
                os.fsync(fd)
                print("full 0")
            except OSError as e:
                print("full", e.errno)
            sys.stdout.flush()
            open(flag, "w").close()
            while os.path.exists(flag):
                time.sleep(0.01)
            os.close(fd)
            print("closed")
            """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        let out = tmp + "/fsync.out"
        p.arguments = ["-c", "python3 -c \(shq(py)) \(shq(m.path(d))) \(shq(src)) \(shq(flag)) > \(shq(out)) 2>&1"]
        try p.run()
        XCTAssertTrue(pollUntil(60) { FileManager.default.fileExists(atPath: flag) || !p.isRunning })
        // Still open: a successful fsync means the blob is stored already.
        let afterFsync = stored(d, m)
        try? FileManager.default.removeItem(atPath: flag)
        p.waitUntilExit()
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        XCTAssertEqual(text, "partial \(EIO)\nfull 0\nclosed\n")
        XCTAssertTrue(afterFsync, "fsync returned 0 but the blob was not stored")
        XCTAssertEqual(mustSh("cmp \(shq(src)) \(shq(m.path(d))) && echo same"), "same\n")
    }
}
