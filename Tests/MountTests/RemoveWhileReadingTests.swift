import CASCore
import Foundation
import TestSupport
import XCTest

/// A blob removed while a reader streams it: the reader gets every byte;
/// opens after the removal find no such file.
final class RemoveWhileReadingTests: MountTestCase {
    static let blobSize = 150 << 20

    /// A slow reader: reads 1 MiB, says so, waits for the go file, then reads
    /// the rest at 1 MiB per 20 ms; prints the SHA-256 and the byte count.
    static let reader = """
        import hashlib, os, sys, time
        path, ready, go = sys.argv[1:4]
        h = hashlib.sha256()
        n = 0
        with open(path, "rb", buffering=0) as f:
            b = f.read(1 << 20)
            h.update(b)
            n += len(b)
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
                n += len(b)
                time.sleep(0.02)
        print(h.hexdigest(), n)
        """

    final class SlowReader {
        let process: Process
        let ready: String
        let go: String
        let out: String

        init(path: String, dir: String) throws {
            let id = UUID().uuidString.prefix(6)
            ready = "\(dir)/ready-\(id)"
            go = "\(dir)/go-\(id)"
            out = "\(dir)/reader-\(id).out"
            process = Process()
            process.executableURL = URL(fileURLWithPath: "/bin/bash")
            process.arguments = ["-c", "python3 -c \(shq(RemoveWhileReadingTests.reader)) \(shq(path)) \(shq(ready)) \(shq(go)) > \(shq(out)) 2>&1"]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
        }

        func waitUntilReading() -> Bool {
            pollUntil(120) { FileManager.default.fileExists(atPath: ready) || !process.isRunning }
                && FileManager.default.fileExists(atPath: ready)
        }

        /// Lets it read the rest; returns what it printed.
        func finish() -> String {
            _ = FileManager.default.createFile(atPath: go, contents: nil)
            process.waitUntilExit()
            return ((try? String(contentsOfFile: out, encoding: .utf8)) ?? "") + (process.terminationStatus == 0 ? "" : " (exit \(process.terminationStatus))")
        }
    }

    func bigBlob() throws -> (path: String, digest: Digest) {
        try localBlob(randomData(Self.blobSize, seed: 31))
    }

    /// Asserts that opening `path` now finds no such file.
    func assertGone(_ path: String, _ context: String, file: StaticString = #filePath, line: UInt = #line) {
        for cmd in ["cat \(shq(path)) >/dev/null", "stat \(shq(path))", "head -c 1 \(shq(path)) >/dev/null"] {
            let r = sh(cmd)
            XCTAssertFalse(r.ok, "\(context): \(cmd) succeeded", file: file, line: line)
            XCTAssertTrue(r.stderr.contains("No such file"), "\(context): \(cmd): \(r.stderr)", file: file, line: line)
        }
    }

    /// rm through the mount while it streams (with the mount's passthrough
    /// setting `options`), the kernel's page cache dropped after the rm so
    /// that the rest is read from the daemon or the backing file.
    func removeWhileStreaming(_ m: (mountpoint: String, store: String), _ d: Digest, context: String) throws {
        let path = m.mountpoint + "/sha256/\(d)"
        let reader = try SlowReader(path: path, dir: tmp)
        XCTAssertTrue(reader.waitUntilReading(), "\(context): the reader did not start: \(reader.finish())")
        mustSh("rm \(shq(path))")
        mustSh("echo 3 > /proc/sys/vm/drop_caches")
        XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: m.store, d)), "\(context): still in the store")
        assertGone(path, "\(context), after the rm")
        XCTAssertEqual(reader.finish(), "\(d.hash) \(d.size)\n", "\(context): the reader did not get every byte")
        assertGone(path, "\(context), after the reader finished")
    }

    func testRemoveWhileStreamingOnTheZeroConfigStack() throws {
        let m = try zeroConfigMount()
        let (src, d) = try bigBlob()
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        try removeWhileStreaming((m.mountpoint, m.dataDirectory), d, context: "zero-config")
        XCTAssertTrue(m.isRunning)
    }

    func testRemoveWhileStreamingThroughTheDaemon() throws {
        let m = try mount(try indexedDiskConfig(), options: ["passthrough=off"])
        let (src, d) = try bigBlob()
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        try removeWhileStreaming((m.mountpoint, storeDir), d, context: "passthrough=off")
        XCTAssertEqual(try m.stats()["casfs_passthrough_opens_total"], 0)
        XCTAssertTrue(m.isRunning)
    }

    func testRemoveWhileStreamingThroughPassthrough() throws {
        let m = try mount(try indexedDiskConfig())
        let (src, d) = try bigBlob()
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        try removeWhileStreaming((m.mountpoint, storeDir), d, context: "passthrough")
        XCTAssertGreaterThan(try m.stats()["casfs_passthrough_opens_total"] ?? 0, 0, "the reader was not a passthrough open")
        XCTAssertTrue(m.isRunning)
    }

    /// `casfs cleanup` (another process) deletes the aged blob while a mount
    /// with OPEN and an open-less read-only mount both stream it.
    func testCleanupWhileStreaming() throws {
        let redis = try startRedis()
        let config = try indexedDiskConfig()
        let m = try mount(config, options: ["passthrough=off"])
        let ro = try mount(config, options: ["ro"], name: "ro")
        let (src, d) = try bigBlob()
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        let readers = [try SlowReader(path: m.path(d), dir: tmp), try SlowReader(path: ro.path(d), dir: tmp)]
        for r in readers { XCTAssertTrue(r.waitUntilReading(), "a reader did not start: \(r.finish())") }
        // Opened long ago, as far as cleanup can tell.
        XCTAssertEqual(redis.cli("EXPIRE A:\(d) 10").trimmingCharacters(in: .whitespacesAndNewlines), "1")
        let out = mustSh("\(shq(try casfsBinary())) cleanup --config \(shq(m.configPath)) --high-watermark 1 --low-watermark 0")
        XCTAssertTrue(out.contains("deleted sha256/\(d)"), out)
        XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: storeDir, d)))
        mustSh("echo 3 > /proc/sys/vm/drop_caches")
        // The mount with OPEN: a new open finds the blob gone.
        assertGone(m.path(d), "mount with OPEN, after cleanup")
        // Open-less: the kernel opens by itself while it holds the entry (the
        // streaming reader keeps it): whole bytes or no such file, never less.
        let r = sh("set -o pipefail; sha256sum < \(shq(ro.path(d))) | cut -c1-64")
        if r.ok { XCTAssertEqual(r.stdout, d.hash + "\n") } else { XCTAssertTrue(r.stderr.contains("No such file"), r.stderr) }
        for reader in readers {
            XCTAssertEqual(reader.finish(), "\(d.hash) \(d.size)\n", "a reader did not get every byte")
        }
        // Once the kernel lets go of the entry, the open-less mount looks it up again.
        mustSh("echo 3 > /proc/sys/vm/drop_caches")
        assertGone(ro.path(d), "open-less mount, after the readers finished")
        assertGone(m.path(d), "mount with OPEN, after the readers finished")
        XCTAssertTrue(m.isRunning && ro.isRunning)
    }

    /// A blob the kernel learnt from a listing (`ls -l`: readdirplus, no
    /// lookup), then deleted by cleanup: opening it is ENOENT, as after a lookup.
    func testListedBlobDeletedByCleanupIsNoSuchFile() throws {
        let config = try indexedDiskConfig()
        let m = try mount(config)
        let (src, d) = try localBlob(randomData(10_000, seed: 32))
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        m.unmount()
        try m.mount()
        XCTAssertTrue(mustSh("ls -l \(shq(m.sha256))").contains(d.description))
        let out = mustSh("\(shq(try casfsBinary())) cleanup --config \(shq(m.configPath)) --high-watermark 1 --low-watermark 0")
        XCTAssertTrue(out.contains("deleted sha256/\(d)"), out)
        let r = sh("cat \(shq(m.path(d)))")
        XCTAssertFalse(r.ok)
        XCTAssertTrue(r.stderr.contains("No such file"), r.stderr)
        assertGone(m.path(d), "after cleanup")
    }

    /// An open-less read-only mount streams a blob that `rm` on a writable
    /// mount of the same store removes.
    func testRemoveOnAnotherMountWhileAnOpenlessMountStreams() throws {
        let config = try indexedDiskConfig()
        let m = try mount(config)
        let ro = try mount(config, options: ["ro"], name: "ro")
        let (src, d) = try bigBlob()
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        let reader = try SlowReader(path: ro.path(d), dir: tmp)
        XCTAssertTrue(reader.waitUntilReading(), "the reader did not start: \(reader.finish())")
        mustSh("rm \(shq(m.path(d)))")
        mustSh("echo 3 > /proc/sys/vm/drop_caches")
        assertGone(m.path(d), "writable mount, after the rm")
        XCTAssertEqual(reader.finish(), "\(d.hash) \(d.size)\n", "the open-less reader did not get every byte")
        mustSh("echo 3 > /proc/sys/vm/drop_caches")
        assertGone(ro.path(d), "open-less mount, after the reader finished")
        XCTAssertTrue(m.isRunning && ro.isRunning)
    }
}
