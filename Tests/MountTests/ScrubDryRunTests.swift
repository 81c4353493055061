import CASCore
import Foundation
import TestSupport
import XCTest

extension MediaDamageTests {
    /// Media damage under a proof that still holds, found by
    /// `casfs scrub --dry-run`: the file stays, but its proof is void, so a
    /// mount started after it (passthrough on) checks the blob and refuses
    /// it, and so does a mount that was running during the scrub.
    func testDryRunScrubVoidsTheProofOfTheDamage() throws {
        let l = try makeLoop()
        let store = l.mountpoint + "/store"
        let config = indexedDiskConfig(port: try startRedis().port, store: store)
        let blobs = try storeAndDamage(l, config: config, store: store)
        let running = try mount(config, name: "running")
        XCTAssertTrue(checkedRead(running, blobs[1].digest, "an intact blob before the scrub"))

        let scrub = sh("\(shq(casfs)) scrub --config \(shq(try configFile(config))) --rate 0 --dry-run")
        XCTAssertEqual(scrub.status, 1, "\(scrub)")
        XCTAssertTrue(scrub.stdout.contains("left as it is (dry run)"), scrub.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: diskObjectPath(root: store, blobs[0].digest)))
        XCTAssertNil(try? FileManager.default.destinationOfSymbolicLink(atPath: proofRecord(store, blobs[0].digest)),
                     "the damaged file's proof record is kept")

        // A mount started after the scrub (passthrough on) checks the blob and refuses it.
        let after = try mount(config, name: "after")
        let before = try after.stats()
        XCTAssertFalse(checkedRead(after, blobs[0].digest, "a mount started after the scrub"),
                       "a mount started after the scrub read the damaged blob without error")
        let stats = try after.stats()
        XCTAssertGreaterThan(stats["casfs_verify_failures_total"] ?? 0, before["casfs_verify_failures_total"] ?? 0,
                             "the mount started after the scrub did not check the damaged blob")
        for b in blobs.dropFirst() { XCTAssertTrue(checkedRead(after, b.digest, "an intact blob")) }
        // The mount that ran during the scrub does not serve it either.
        XCTAssertFalse(checkedRead(running, blobs[0].digest, "the mount running during the scrub"),
                       "the mount running during the scrub read the damaged blob without error")
        after.unmount()
        running.unmount()
    }
}
