import CASCore
import Foundation
import TestSupport
import XCTest

/// The `casfs mount` command itself: background start, signals, bad input.
final class MountCommandTests: MountTestCase {
    func testBackgroundMountReturnsWhenReadyAndUnmounts() throws {
        let bin = try casfsBinary()
        let config = tmp + "/c.yaml"
        try cachedDiskConfig().write(toFile: config, atomically: true, encoding: .utf8)
        let mp = tmp + "/mnt"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        defer { if isFuseMounted(mp) { _ = sh("fusermount3 -u \(shq(mp)) || fusermount3 -uz \(shq(mp))") } }
        let r = sh("\(bin) mount --config \(shq(config)) --staging-dir \(shq(tmp)) --log-file \(shq(tmp + "/log")) \(shq(mp)) && ls \(shq(mp))")
        XCTAssertTrue(r.ok, "\(r)")
        XCTAssertEqual(r.stdout, "sha256\ntree\n")
        XCTAssertTrue(isFuseMounted(mp))
        let pid = sh("pgrep -f -- \(shq(mp + " --foreground"))").stdout.split(separator: "\n").first.flatMap { Int32($0) }
        let daemon = try XCTUnwrap(pid, "no daemon process found")
        mustSh("fusermount3 -u \(shq(mp))")
        XCTAssertTrue(pollUntil(30) { kill(daemon, 0) != 0 }, "daemon still running after fusermount3 -u")
        XCTAssertFalse(isFuseMounted(mp))
    }

    func testSigtermUnmountsCleanly() throws {
        let m = try mount(cachedDiskConfig())
        kill(m.pid, SIGTERM)
        XCTAssertTrue(pollUntil(30) { !m.isRunning })
        XCTAssertEqual(m.process?.terminationStatus, 0)
        XCTAssertFalse(isFuseMounted(m.mountpoint))
    }

    func testBadInputMountsNothing() throws {
        let bin = try casfsBinary()
        let mp = tmp + "/mnt"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        let config = tmp + "/c.yaml"
        try cachedDiskConfig().write(toFile: config, atomically: true, encoding: .utf8)
        let badOption = sh("\(bin) mount --config \(shq(config)) -o bogus=1 \(shq(mp))")
        XCTAssertFalse(badOption.ok)
        XCTAssertTrue(badOption.stderr.contains("bogus"), badOption.stderr)
        let noDir = sh("\(bin) mount --config \(shq(config)) \(shq(tmp + "/missing"))")
        XCTAssertFalse(noDir.ok)
        XCTAssertTrue(noDir.stderr.contains("not a directory"), noDir.stderr)
        try "storage: !no-such-storage {}\n".write(toFile: tmp + "/bad.yaml", atomically: true, encoding: .utf8)
        let badConfig = sh("\(bin) mount --config \(shq(tmp + "/bad.yaml")) \(shq(mp))")
        XCTAssertFalse(badConfig.ok)
        XCTAssertFalse(badConfig.stderr.isEmpty)
        XCTAssertFalse(isFuseMounted(mp))
    }

    /// No --config: a local store in $XDG_DATA_HOME/casfs with a private Redis
    /// that the mount starts and stops; a remount finds what was written.
    func testZeroConfigMountKeepsBlobsAcrossRemounts() throws {
        let bin = try casfsBinary()
        let mp = tmp + "/mnt"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        defer { if isFuseMounted(mp) { _ = sh("fusermount3 -u \(shq(mp)) || fusermount3 -uz \(shq(mp))") } }
        let env = "XDG_DATA_HOME=\(shq(tmp + "/xdg"))"
        let (src, d) = try localBlob(randomData(123_457, seed: 77))
        mustSh("\(env) \(bin) mount --log-file \(shq(tmp + "/log")) \(shq(mp))")
        mustSh("cp \(shq(src)) \(shq(mp + "/sha256/\(d)"))")
        XCTAssertTrue(FileManager.default.fileExists(atPath: diskObjectPath(root: tmp + "/xdg/casfs", d)))
        let redisPid = try XCTUnwrap(Int32(mustSh("cat \(shq(tmp + "/xdg/casfs/redis/redis.pid"))").trimmingCharacters(in: .whitespacesAndNewlines)))
        XCTAssertEqual(kill(redisPid, 0), 0, "private redis not running")
        mustSh("fusermount3 -u \(shq(mp))")
        XCTAssertTrue(pollUntil(30) { kill(redisPid, 0) != 0 }, "private redis still running after unmount")
        mustSh("\(env) \(bin) mount --log-file \(shq(tmp + "/log")) \(shq(mp))")
        XCTAssertEqual(mustSh("sha256sum < \(shq(mp + "/sha256/\(d)")) | cut -c1-64"), d.hash + "\n")
        XCTAssertEqual(mustSh("ls \(shq(mp + "/sha256"))"), "\(d)\n")
        mustSh("fusermount3 -u \(shq(mp))")
    }
}
