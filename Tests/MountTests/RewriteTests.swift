import CASCore
import Foundation
import TestSupport
import XCTest

/// Rewriting a blob under its own name never changes what readers see: the
/// same bytes again are accepted, other bytes fail at close, and readers
/// looping over it read the blob, whole, every time.
final class RewriteTests: MountTestCase {
    /// Three readers (`cat`, `sha256sum`, `dd`) loop over `path` until
    /// `stop` exists; each logs `ok` or `bad <what it read>` per read.
    final class Readers {
        let logs: [String]
        let stop: String
        let process: Process

        init(path: String, original: String, hash: String, dir: String) throws {
            let stop = dir + "/stop"
            let logs = (1...3).map { "\(dir)/reader\($0).log" }
            self.stop = stop
            self.logs = logs
            let p = shq(path), o = shq(original)
            let loops = [
                "cat \(p) > \(shq(dir + "/r1.out")); if cmp -s \(shq(dir + "/r1.out")) \(o); then echo ok; else echo \"bad $(stat -c %s \(shq(dir + "/r1.out"))) bytes\"; fi",
                "h=$(sha256sum < \(p) | cut -c1-64); if [ \"$h\" = \(hash) ]; then echo ok; else echo \"bad hash $h\"; fi",
                "n=$(dd if=\(p) bs=64k status=none | tee \(shq(dir + "/r3.out")) | wc -c); if cmp -s \(shq(dir + "/r3.out")) \(o); then echo ok; else echo \"bad $n bytes\"; fi",
            ]
            let script = zip(loops, logs).map { loop, log in
                "(while [ ! -e \(shq(stop)) ]; do \(loop); done > \(shq(log)) 2>&1) &"
            }.joined(separator: "\n") + "\nwait\n"
            try script.write(toFile: dir + "/readers.sh", atomically: true, encoding: .utf8)
            process = Process()
            process.executableURL = URL(fileURLWithPath: "/bin/bash")
            process.arguments = [dir + "/readers.sh"]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
        }

        func lines(_ i: Int) -> [String] {
            ((try? String(contentsOfFile: logs[i], encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
        }

        /// Waits until every reader has finished `n` reads.
        func waitForReads(_ n: Int) -> Bool { pollUntil(120) { (0..<3).allSatisfy { lines($0).count >= n } } }

        /// Stops the readers; returns (good reads, bad reads with what they saw).
        func finish() -> (ok: Int, bad: [String]) {
            _ = FileManager.default.createFile(atPath: stop, contents: nil)
            process.waitUntilExit()
            let all = (0..<3).flatMap { lines($0) }
            return (all.filter { $0 == "ok" }.count, all.filter { $0 != "ok" })
        }
    }

    func rewriteWhileReading(mountpoint: String, store: String, log: () -> String, rejected: () throws -> Int64) throws {
        let data = randomData(8 << 20, seed: 21)
        let (src, d) = try localBlob(data, name: "original")
        let path = mountpoint + "/sha256/\(d)"
        mustSh("cp \(shq(src)) \(shq(path))")
        let stored = diskObjectPath(root: store, d)
        XCTAssertTrue(FileManager.default.fileExists(atPath: stored))
        let rejectedBefore = try rejected()

        let dir = tmp + "/readers-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let readers = try Readers(path: path, original: src, hash: d.hash, dir: dir)
        XCTAssertTrue(readers.waitForReads(1), "the readers never read")

        // 20 rewrites with the same bytes: each accepted.
        var failures: [String] = []
        for i in 0..<20 {
            let r = sh("cp \(shq(src)) \(shq(path))")
            if !r.ok { failures.append("cp \(i): \(r.stderr)") }
        }
        XCTAssertEqual(failures, [])
        XCTAssertEqual(try rejected(), rejectedBefore, "a same-bytes rewrite was counted as rejected")

        // Other bytes of the same length under the same name: EIO at close.
        var other = data
        other[other.count / 2] ^= 0xff
        let (otherPath, _) = try localBlob(other, name: "other")
        for _ in 0..<3 {
            let r = sh("cp \(shq(otherPath)) \(shq(path))")
            XCTAssertFalse(r.ok, "a rewrite with other bytes succeeded")
            XCTAssertTrue(r.stderr.contains("Input/output error"), r.stderr)
        }
        // A shorter rewrite: EIO too.
        let short = sh("head -c 1000 \(shq(otherPath)) > \(shq(path))")
        XCTAssertFalse(short.ok)
        XCTAssertTrue(readers.waitForReads(3))
        let (ok, bad) = readers.finish()
        XCTAssertEqual(bad, [], "readers saw short or wrong bytes (\(bad.count) of \(ok + bad.count) reads)")
        XCTAssertGreaterThan(ok, 0)
        // The blob, its stored bytes and its size are as they were.
        XCTAssertEqual(mustSh("stat -c %s \(shq(path))"), "\(d.size)\n")
        XCTAssertEqual(mustSh("sha256sum < \(shq(path)) | cut -c1-64"), d.hash + "\n")
        XCTAssertEqual(mustSh("sha256sum < \(shq(stored)) | cut -c1-64"), d.hash + "\n", "the stored object changed")
        XCTAssertEqual(mustSh("echo 3 > /proc/sys/vm/drop_caches; cmp \(shq(src)) \(shq(path)) && echo same"), "same\n")
        print("same-bytes rewrites under 3 readers: \(ok) reads, all whole")
    }

    /// The zero-config stack (a memory cache in front of the disk store).
    func testSameBytesRewriteUnderReadersOnTheZeroConfigStack() throws {
        let m = try zeroConfigMount()
        try rewriteWhileReading(mountpoint: m.mountpoint, store: m.dataDirectory, log: { m.log },
                                rejected: { try m.stats()["casfs_writes_rejected_total"] ?? -1 })
    }

    /// Index over a disk store, nothing in memory: readers of a verified
    /// blob get passthrough opens (as root), and writers join them.
    func testSameBytesRewriteUnderPassthroughReaders() throws {
        let m = try mount(try indexedDiskConfig())
        try rewriteWhileReading(mountpoint: m.mountpoint, store: storeDir, log: { m.log },
                                rejected: { try m.stats()["casfs_writes_rejected_total"] ?? -1 })
        XCTAssertGreaterThan(try m.stats()["casfs_passthrough_opens_total"] ?? 0, 0,
                             "no reader was a passthrough open: this test did not cover passthrough")
    }

    /// A writable shared mapping of an existing blob, opened read-write while
    /// another process reads it through passthrough, must never reach the
    /// stored object: mmap or open fails, and the store keeps its bytes.
    func testSharedWritableMapOfABlobBeingReadNeverChangesTheStore() throws {
        let m = try mount(try indexedDiskConfig())
        // From 1 MiB: smaller blobs are served by the daemon, never passed through.
        let data = randomData(2_000_000, seed: 22)
        let (src, d) = try localBlob(data)
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        let stored = diskObjectPath(root: storeDir, d)
        // A reader holds the blob open (a passthrough open) meanwhile.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/bin/bash")
        holder.arguments = ["-c", "exec 3< \(shq(m.path(d))); echo open > \(shq(tmp + "/held")); read -t 600 x < \(shq(tmp + "/fifo")); exec 3<&-"]
        mustSh("mkfifo \(shq(tmp + "/fifo"))")
        try holder.run()
        defer {
            runShell("echo done > \(shq(tmp + "/fifo"))")
            holder.waitUntilExit()
        }
        XCTAssertTrue(pollUntil(30) { FileManager.default.fileExists(atPath: tmp + "/held") })
        XCTAssertGreaterThan(try m.stats()["casfs_passthrough_opens_total"] ?? 0, 0,
                             "the reader is not a passthrough open: this test did not cover passthrough")
        let py = """
            import mmap, os, sys
            path = sys.argv[1]
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as e:
                print("open", e.errno); sys.exit(0)
            try:
                mm = mmap.mmap(fd, \(d.size), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                print("mmap", e.errno); os.close(fd); sys.exit(0)
            mm[0:4] = b"EVIL"
            mm.flush()
            mm.close()
            try:
                os.close(fd)
                print("written")
            except OSError as e:
                print("close", e.errno)
            """
        let out = mustSh("python3 -c \(shq(py)) \(shq(m.path(d)))")
        XCTAssertNotEqual(out, "written\n", "a shared writable mapping of a blob succeeded")
        XCTAssertTrue(out == "open \(EBUSY)\n" || out.hasPrefix("mmap "), out)
        XCTAssertEqual(mustSh("sha256sum < \(shq(stored)) | cut -c1-64"), d.hash + "\n", "the stored object was changed through a mapping")
        XCTAssertEqual(mustSh("echo 3 > /proc/sys/vm/drop_caches; sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        // Writers that cannot map (write-only) still rewrite the same bytes.
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        XCTAssertEqual(mustSh("sha256sum < \(shq(stored)) | cut -c1-64"), d.hash + "\n")
    }
}
