import CASCore
import Foundation
import TestSupport
import XCTest

/// A configured mount notices when its index loses entries (Redis restarted
/// empty, a policy that evicts keys), says so in its log, its metrics and
/// `casfs stat`, and repairs a lost index by a background reindex.
final class IndexLossTests: MountTestCase {
    func stat(_ args: String) -> ShellResult {
        runShell("\(shq((try? casfsBinary()) ?? "casfs")) stat \(args)")
    }

    /// `df`'s used KiB of a mount.
    func dfUsedKiB(_ mountpoint: String) -> Int? {
        Int(runShell("df -k --output=used \(shq(mountpoint)) | tail -1").stdout.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    func testRedisRestartedEmptyUnderAConfiguredMount() throws {
        let config = tmp + "/cas.yaml"
        try indexedDiskConfig().write(toFile: config, atomically: true, encoding: .utf8)
        let m = try mount(try indexedDiskConfig())
        var blobs: [Digest] = []
        for i in 0..<12 {
            let (p, d) = try localBlob(randomData(200_000 + i, seed: 300 + UInt64(i)))
            mustSh("cp \(shq(p)) \(shq(m.path(d)))")
            blobs.append(d)
        }
        let listed = blobs.map(\.description).sorted().joined(separator: "\n") + "\n"
        XCTAssertEqual(mustSh("ls \(shq(m.sha256)) | sort"), listed)
        let usedBefore = try XCTUnwrap(dfUsedKiB(m.mountpoint))
        XCTAssertGreaterThan(usedBefore, 12 * 190)
        XCTAssertTrue(stat("--config \(shq(config))").stdout.contains("index:       ok"))
        // Older than the check's settling time (a write in flight is not a loss).
        sleep(6)

        // Redis restarted with nothing (its data was not saved).
        let r = try XCTUnwrap(redis)
        r.stop(saving: false)
        try r.startAgain()
        XCTAssertEqual(r.cli("DBSIZE").trimmingCharacters(in: .whitespacesAndNewlines), "0")

        // Noticed while mounted, logged once, counted, repaired in the background.
        XCTAssertTrue(pollUntil(120) { m.log.contains("much emptier than its store") }, "not noticed; log:\n\(m.log.suffix(3000))")
        XCTAssertTrue(pollUntil(120) { self.sh("ls \(shq(m.sha256)) | sort").stdout == listed }, "ls did not come back; log:\n\(m.log.suffix(3000))")
        XCTAssertTrue(pollUntil(120) { (self.dfUsedKiB(m.mountpoint) ?? 0) >= usedBefore }, "df did not come back: \(String(describing: dfUsedKiB(m.mountpoint))) KiB used")
        XCTAssertTrue(pollUntil(120) { m.log.contains("agrees with its store again") }, m.log)
        XCTAssertEqual(m.log.components(separatedBy: "much emptier than its store").count - 1, 1, "logged once: \(m.log)")
        let stats = try m.stats()
        XCTAssertGreaterThanOrEqual(stats["casfs_index_loss_detected_total"] ?? 0, 1)
        XCTAssertGreaterThanOrEqual(stats["casfs_index_background_reindexes_total"] ?? 0, 1)
        XCTAssertEqual(stats["casfs_index_problem"] ?? -1, 0, "no problem left")
        XCTAssertEqual(r.cli("EXISTS total_size").trimmingCharacters(in: .whitespacesAndNewlines), "1")
    }

    /// `casfs stat` shows a lost index (here: Redis emptied with no mount running),
    /// and so does `casfs stat --mount` once the mount has looked.
    func testStatShowsALostIndex() throws {
        let config = tmp + "/cas.yaml"
        try indexedDiskConfig().write(toFile: config, atomically: true, encoding: .utf8)
        let m = try mount(try indexedDiskConfig())
        for i in 0..<6 {
            let (p, d) = try localBlob(randomData(50_000 + i, seed: 400 + UInt64(i)))
            mustSh("cp \(shq(p)) \(shq(m.path(d)))")
        }
        m.unmount()
        sleep(6)
        let r = try XCTUnwrap(redis)
        r.cli("FLUSHALL")
        let s = stat("--config \(shq(config))")
        XCTAssertTrue(s.ok, "\(s)")
        XCTAssertTrue(s.stdout.contains("index:       the index is much emptier than its store: 6 of 6 blobs"), s.stdout)
        XCTAssertTrue(s.stdout.contains("no total_size counter"), s.stdout)
        let json = stat("--config \(shq(config)) --json")
        XCTAssertTrue(json.stdout.contains("index_problems"), json.stdout)

        // The mount finds the same at its start and repairs it.
        try m.mount()
        XCTAssertTrue(pollUntil(120) { self.stat("--config \(shq(config))").stdout.contains("index:       ok") },
                      "not repaired; log:\n\(m.log.suffix(3000))")
        XCTAssertTrue(pollUntil(60) { self.stat("--mount \(shq(m.mountpoint))").stdout.contains("index:       ok") },
                      "\(stat("--mount \(shq(m.mountpoint))"))")
    }

    /// A Redis that evicts keys: warned at start, shown by `casfs stat` and
    /// `casfs stat --mount` (CONFIG refused: read from INFO memory).
    func testEvictingRedisIsWarnedAboutAtStartAndInStat() throws {
        let r = try startRedis()
        r.cli("CONFIG SET maxmemory-policy allkeys-lru")
        let config = tmp + "/cas.yaml"
        try indexedDiskConfig().write(toFile: config, atomically: true, encoding: .utf8)
        let m = try mount(try indexedDiskConfig())
        XCTAssertTrue(pollUntil(60) { m.log.contains("maxmemory-policy allkeys-lru") }, "not warned at start; log:\n\(m.log)")
        let s = stat("--config \(shq(config))")
        XCTAssertTrue(s.stdout.contains("maxmemory-policy allkeys-lru"), s.stdout)
        XCTAssertTrue(pollUntil(60) { self.stat("--mount \(shq(m.mountpoint))").stdout.contains("evicts keys") },
                      stat("--mount \(shq(m.mountpoint))").stdout)
        // A managed Redis that refuses CONFIG: the policy comes from INFO memory.
        r.cli("CONFIG SET maxmemory-policy volatile-lfu")
        r.cli("ACL SETUSER default -config")
        defer { r.cli("ACL SETUSER default +@all") }
        XCTAssertTrue(r.cli("CONFIG GET maxmemory-policy").contains("NOPERM"), "CONFIG is not refused")
        let refused = stat("--config \(shq(config))")
        XCTAssertTrue(refused.stdout.contains("maxmemory-policy volatile-lfu"), refused.stdout)
    }
}
