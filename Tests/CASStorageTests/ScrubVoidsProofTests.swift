import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

/// Damage a scrub finds and does not remove is proven no more, in any
/// process.
final class ScrubVoidsProofTests: XCTestCase {
    func pattern(_ count: Int, seed: Int) -> Data {
        var bytes = [UInt8](repeating: 0, count: count)
        var x = UInt64(truncatingIfNeeded: seed) &* 0x9E37_79B9_7F4A_7C15 | 1
        for i in bytes.indices {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            bytes[i] = UInt8(truncatingIfNeeded: x)
        }
        return Data(bytes)
    }

    /// Makes a proven object hold other bytes while its proof still holds,
    /// as media damage does (the proof is recorded for the changed file).
    func damageProven(_ s: DiskStorage, _ d: Digest) throws {
        let p = s.objectPath(d)
        let fd = open(p, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        var b: UInt8 = 0
        XCTAssertEqual(pread(fd, &b, 1, 5), 1)
        b ^= 0x5a
        XCTAssertEqual(pwrite(fd, &b, 1, 5), 1)
        close(fd)
        s.recordProof(d, try XCTUnwrap(FileStamp.of(path: p)))
        XCTAssertTrue(try XCTUnwrap(s.openBlob(d)).isVerified, "the damaged copy is not proven (the test's premise)")
    }

    /// A dry-run scrub leaves a damaged object in place but voids its
    /// proof: in this process and in any other store on the same root
    /// (whose proof record names the old change time), it is checked again
    /// and refused.
    func testDryRunScrubVoidsTheProofOfWhatItFinds() throws {
        let root = tempDir()
        let s = try DiskStorage(root: root, proofRecordThreshold: 1)
        let data = pattern(100_000, seed: 7)
        let d = Digest.of(data)
        try s.commitWrite(d, DataSource(data, verified: true))
        try damageProven(s, d)
        let other = try DiskStorage(root: root, proofRecordThreshold: 1)
        XCTAssertTrue(try XCTUnwrap(other.openBlob(d)).isVerified, "the proof record is not shared (the test's premise)")

        let target = ScrubTarget(name: "disk", disk: s, index: nil, repairSources: [])
        var findings: [ScrubFinding] = []
        let summary = try Scrubber(target, rate: 0, dryRun: true, metrics: .standalone("scrub")).run { findings.append($0) }
        XCTAssertEqual(summary.damaged, 1)
        XCTAssertEqual(findings.map(\.repair), [.leftAlone])
        XCTAssertTrue(FileManager.default.fileExists(atPath: s.objectPath(d)), "a dry run removed the file")

        for (name, store) in [("this store", s), ("another store", other),
                              ("a store opened afterwards", try DiskStorage(root: root, proofRecordThreshold: 1))] {
            let f = try XCTUnwrap(store.openBlob(d), name)
            XCTAssertFalse(f.isVerified, "\(name) still takes the damaged copy as proven")
            XCTAssertThrowsError(try f.verify(d), "\(name): the damaged bytes pass a check")
        }
    }

    /// A scrub that finds damage it cannot remove (here the store's
    /// temporary area, where a removal moves the file first, is not a
    /// directory) leaves the file without a proof.
    func testFailedRemovalLeavesNoProof() throws {
        let root = tempDir()
        let s = try DiskStorage(root: root, proofRecordThreshold: 1)
        let (d, data) = blob("damaged, and the removal fails")
        try s.commitWrite(d, DataSource(data, verified: true))
        try damageProven(s, d)
        let tmp = root + "/tmp"
        XCTAssertEqual(rename(tmp, root + "/tmp-away"), 0)
        try Data().write(to: URL(fileURLWithPath: tmp))
        let target = ScrubTarget(name: "disk", disk: s, index: nil, repairSources: [])
        var findings: [ScrubFinding] = []
        _ = try Scrubber(target, rate: 0, metrics: .standalone("scrub")).run { findings.append($0) }
        XCTAssertEqual(unlink(tmp), 0)
        XCTAssertEqual(rename(root + "/tmp-away", tmp), 0)
        XCTAssertEqual(findings.count, 1)
        guard case .failed = findings.first?.repair else { return XCTFail("\(findings)") }
        XCTAssertTrue(FileManager.default.fileExists(atPath: s.objectPath(d)))
        XCTAssertFalse(try XCTUnwrap(s.openBlob(d)).isVerified, "the damaged copy is still proven")
        XCTAssertFalse(try XCTUnwrap(DiskStorage(root: root, proofRecordThreshold: 1).openBlob(d)).isVerified)
    }
}
