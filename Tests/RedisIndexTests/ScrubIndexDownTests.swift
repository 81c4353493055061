import CASCore
import CASStorage
import Foundation
import Redis
import TestSupport
import XCTest

/// A scrub that cannot remove the damage it finds (the index is down)
/// leaves it unproven.
final class ScrubIndexDownTests: XCTestCase {
    /// Damage found by a scrub while Redis is down: the removal fails (the
    /// index cannot follow), the file stays, and no store on the root takes
    /// it as proven any more.
    func testScrubWithRedisDownLeavesTheDamageUnproven() throws {
        let root = NSTemporaryDirectory() + "casfs-test-scrub-redis-down-\(UUID().uuidString)"
        let disk = try DiskStorage(root: root, proofRecordThreshold: 1)
        defer { try? FileManager.default.removeItem(atPath: root) }
        let (d, data) = blob(bytes: 50_000, seed: 3)
        try disk.commitWrite(d, DataSource(data, verified: true))
        // Other bytes under a proof that still holds, as media damage leaves it.
        let p = disk.objectPath(d)
        let fd = open(p, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        var b: UInt8 = 0x77
        XCTAssertEqual(pwrite(fd, &b, 1, 100), 1)
        close(fd)
        disk.recordProof(d, try XCTUnwrap(FileStamp.of(path: p)))
        let other = try DiskStorage(root: root, proofRecordThreshold: 1)
        XCTAssertTrue(try XCTUnwrap(other.openBlob(d)).isVerified, "the test's premise: the damage is proven")

        let server = try RedisServer.unixSocket()
        let index = try RedisIndex(redis: RedisPool(server.config(commandTimeout: 0.5, connectTimeout: 0.5)), storage: disk)
        server.stop()
        var findings: [ScrubFinding] = []
        let target = ScrubTarget(name: "disk", disk: disk, index: index, repairSources: [])
        _ = try Scrubber(target, rate: 0, metrics: .standalone("scrub")).run { findings.append($0) }
        XCTAssertEqual(findings.count, 1)
        guard case .failed = findings.first?.repair else { return XCTFail("\(findings)") }
        XCTAssertTrue(FileManager.default.fileExists(atPath: p))
        for (name, store) in [("the scrubbed store", disk), ("another store", other),
                              ("a store opened afterwards", try DiskStorage(root: root, proofRecordThreshold: 1))] {
            let f = try XCTUnwrap(store.openBlob(d), name)
            XCTAssertFalse(f.isVerified, "\(name) takes the damaged copy as proven")
            XCTAssertThrowsError(try f.verify(d), name)
        }
    }
}
