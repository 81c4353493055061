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
        XCTAssertEqual(r.stdout, "sha256\n")
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
        let noConfig = sh("\(bin) mount \(shq(mp))")
        XCTAssertFalse(noConfig.ok)
        XCTAssertTrue(noConfig.stderr.contains("--config"), noConfig.stderr)
        try "storage: !no-such-storage {}\n".write(toFile: tmp + "/bad.yaml", atomically: true, encoding: .utf8)
        let badConfig = sh("\(bin) mount --config \(shq(tmp + "/bad.yaml")) \(shq(mp))")
        XCTAssertFalse(badConfig.ok)
        XCTAssertFalse(badConfig.stderr.isEmpty)
        XCTAssertFalse(isFuseMounted(mp))
    }
}
