import CASCore
import Foundation
import TestSupport
import XCTest

final class MountStressTests: MountTestCase {
    /// A 2 GiB blob goes in through the mount and streams back out; the daemon
    /// never holds it in memory.
    func testTwoGiBBlobStreamsWithSmallRSS() throws {
        let m = try mount(try indexedDiskConfig())
        let src = tmp + "/big"
        // A fixed pattern, generated quickly: 2 GiB of a repeated 1 MiB random block.
        let block = randomData(1 << 20, seed: 9)
        try block.write(to: URL(fileURLWithPath: tmp + "/block"))
        mustSh("for i in $(seq 2048); do cat \(shq(tmp + "/block")); done > \(shq(src))")
        let hash = mustSh("sha256sum < \(shq(src)) | cut -c1-64").trimmingCharacters(in: .whitespacesAndNewlines)
        let d = try Digest(hash: hash, size: 2 << 30)
        mustSh("dd if=\(shq(src)) of=\(shq(m.path(d))) bs=1M status=none")
        mustSh("echo 3 > /proc/sys/vm/drop_caches")
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        XCTAssertEqual(mustSh("dd if=\(shq(m.path(d))) bs=1M skip=2047 status=none | cmp - \(shq(tmp + "/block")) && echo same"), "same\n")
        let hwm = try XCTUnwrap(m.peakRSSKiB())
        XCTAssertLessThan(hwm, 256 * 1024, "daemon peak RSS \(hwm) KiB while streaming a 2 GiB blob")
        try? FileManager.default.removeItem(atPath: src)
    }

    /// 32 readers of one cold blob make one fallback fetch.
    func testConcurrentColdReadersMakeOneFallbackFetch() throws {
        let data = randomData(16 << 20, seed: 10)
        let d = try placeInDiskStore(data)
        let m = try mount(cachedDiskConfig())
        XCTAssertEqual(try m.stats()["casfs_fallback_fetches_total"], 0)
        let out = tmp + "/out"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        mustSh("for i in $(seq 32); do (sha256sum < \(shq(m.path(d))) | cut -c1-64 > \(shq(out))/$i) & done; wait")
        for i in 1...32 {
            XCTAssertEqual(try String(contentsOfFile: "\(out)/\(i)", encoding: .utf8), d.hash + "\n", "reader \(i)")
        }
        XCTAssertEqual(try m.stats()["casfs_fallback_fetches_total"], 1)
    }

    /// kill -9 during 100 concurrent writes: after remount every indexed blob
    /// reads back and verifies, and no name shows partial content.
    func testKillDuringConcurrentWritesLeavesOnlyWholeBlobs() throws {
        let config = try indexedDiskConfig()
        let m = try mount(config)
        var digests: [Digest] = []
        let srcDir = tmp + "/src"
        for i in 0..<100 {
            let (_, d) = try localBlob(randomData(256 << 10 + i * 4099, seed: 1000 + UInt64(i)))
            digests.append(d)
        }
        // Start the writers in the background, wait until some are indexed, then kill the daemon.
        let script = digests.map { "cp \(srcDir)/\($0.hash) \(shq(m.path($0))) 2>/dev/null &" }.joined(separator: "\n")
        try (script + "\nwait\n").write(toFile: tmp + "/writers.sh", atomically: true, encoding: .utf8)
        let writers = Process()
        writers.executableURL = URL(fileURLWithPath: "/bin/bash")
        writers.arguments = [tmp + "/writers.sh"]
        writers.standardOutput = FileHandle.nullDevice
        writers.standardError = FileHandle.nullDevice
        try writers.run()
        let redis = try startRedis()
        XCTAssertTrue(pollUntil(120) { (Int(redis.cli("DBSIZE").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0) >= 10 })
        m.kill9()
        writers.waitUntilExit()
        m.unmount()
        try m.mount()
        let keys = redis.cli("--scan --pattern 'A:*'").split(separator: "\n").map { String($0.dropFirst(2)) }
        XCTAssertGreaterThanOrEqual(keys.count, 10)
        for k in keys {
            let d = try XCTUnwrap(Digest(parsing: k), k)
            XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n", "indexed blob \(d)")
        }
        for d in digests {
            let r = sh("set -o pipefail; sha256sum < \(shq(m.path(d))) | cut -c1-64")
            if r.ok { XCTAssertEqual(r.stdout, d.hash + "\n", "visible blob \(d) is not whole") }
            else { XCTAssertTrue(r.stderr.contains("No such file"), r.stderr) }
        }
        // The lost writes can be made again.
        for d in digests where !keys.contains(d.description) {
            mustSh("cp \(srcDir)/\(d.hash) \(shq(m.path(d)))")
        }
        XCTAssertEqual(mustSh("ls \(shq(m.sha256)) | wc -l").trimmingCharacters(in: .whitespaces), "100\n")
    }

    /// Redis stopped under load: errors while it is down, service back after, no crash.
    func testRedisRestartUnderLoad() throws {
        let m = try mount(try indexedDiskConfig(), options: ["negative_timeout=0", "entry_timeout=0", "attr_timeout=0"])
        let redis = try startRedis()
        var ds: [Digest] = []
        for i in 0..<20 {
            let (src, d) = try localBlob(randomData(10_000 + i, seed: 500 + UInt64(i)))
            mustSh("cp \(shq(src)) \(shq(m.path(d)))")
            ds.append(d)
        }
        // Background load: readers looping over the blobs until told to stop.
        let stopFile = tmp + "/stop"
        let load = Process()
        load.executableURL = URL(fileURLWithPath: "/bin/bash")
        let names = ds.map { shq(m.path($0)) }.joined(separator: " ")
        load.arguments = ["-c", "for w in 1 2 3 4; do (while [ ! -e \(shq(stopFile)) ]; do for f in \(names); do stat -c %s $f; cat $f >/dev/null; done; done) & done; wait"]
        load.standardOutput = FileHandle.nullDevice
        load.standardError = FileHandle.nullDevice
        try load.run()

        redis.stop(saving: true)
        let (src, fresh) = try localBlob(randomData(7777, seed: 600))
        // A name not confirmed present lately needs the index: EIO. One
        // found present a moment ago is still known (existence cache).
        let down = sh("stat \(shq(m.path(fresh)))")
        XCTAssertFalse(down.ok, "lookup succeeded with Redis down")
        XCTAssertTrue(down.stderr.contains("Input/output error"), down.stderr)
        XCTAssertFalse(sh("cp \(shq(src)) \(shq(m.path(fresh)))").ok, "write succeeded with Redis down")
        XCTAssertTrue(m.isRunning)

        try redis.startAgain()
        XCTAssertTrue(pollUntil(60) { self.sh("stat \(shq(m.path(ds[0])))").ok }, "service did not come back")
        mustSh("cp \(shq(src)) \(shq(m.path(fresh)))")
        for d in ds + [fresh] {
            XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        }
        _ = FileManager.default.createFile(atPath: stopFile, contents: nil)
        load.waitUntilExit()
        XCTAssertTrue(m.isRunning)
        XCTAssertTrue(try m.stats()["casfs_fuse_errors_total"] ?? 0 > 0)
    }
}
