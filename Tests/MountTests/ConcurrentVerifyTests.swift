import CASCore
import Foundation
import TestSupport
import XCTest

/// Several readers of one large store file that casfs has not verified yet
/// (placed behind its back), at once and at different offsets: every one
/// gets the right bytes, or, when the file is damaged, none finishes with
/// exit 0.
final class ConcurrentVerifyTests: MountTestCase {
    func readers(_ m: CasfsMount, _ d: Digest, _ local: String) -> [ShellResult] {
        let file = shq(m.path(d))
        let commands = [
            "set -o pipefail; cat \(file) | sha256sum | cut -c1-64",
            "set -o pipefail; sha256sum < \(file) | cut -c1-64",
            "set -o pipefail; dd if=\(file) bs=1M skip=100 status=none | sha256sum | cut -c1-64",
            "set -o pipefail; dd if=\(file) bs=4k skip=30000 count=50 status=none | sha256sum | cut -c1-64",
            "set -o pipefail; tail -c 1000 \(file) | sha256sum | cut -c1-64",
        ]
        let expected = [
            d.hash, d.hash,
            runShell("dd if=\(shq(local)) bs=1M skip=100 status=none | sha256sum | cut -c1-64").stdout.trimmingCharacters(in: .newlines),
            runShell("dd if=\(shq(local)) bs=4k skip=30000 count=50 status=none | sha256sum | cut -c1-64").stdout.trimmingCharacters(in: .newlines),
            runShell("tail -c 1000 \(shq(local)) | sha256sum | cut -c1-64").stdout.trimmingCharacters(in: .newlines),
        ]
        final class Results: @unchecked Sendable {
            let lock = NSLock()
            var all: [ShellResult?]
            init(_ n: Int) { all = Array(repeating: nil, count: n) }
        }
        let box = Results(commands.count)
        DispatchQueue.concurrentPerform(iterations: commands.count) { i in
            let r = runShell("timeout 600 bash -c \(shq(commands[i]))")
            box.lock.lock()
            box.all[i] = r
            box.lock.unlock()
        }
        let results = box.all
        for (i, r) in results.enumerated() where r!.ok {
            XCTAssertEqual(r!.stdout.trimmingCharacters(in: .newlines), expected[i], "reader \(i) exited 0 with wrong bytes")
        }
        return results.map { $0! }
    }

    func placed(_ size: Int64, seed: String) throws -> (path: String, digest: Digest) {
        let path = "\(tmp)/src/\(seed)"
        let d = try randomFile(path, size: size)
        let object = diskObjectPath(root: storeDir, d)
        try FileManager.default.createDirectory(atPath: (object as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        mustSh("cp \(shq(path)) \(shq(object))")
        try startRedis().cli("SET A:\(d) 1 EX 31536000")
        return (path, d)
    }

    func testConcurrentReadersOfAnUnverifiedBlobAllGetTheRightBytes() throws {
        let b = try placed(256 << 20, seed: "good")
        let m = try mount(try indexedDiskConfig())
        let results = readers(m, b.digest, b.path)
        for (i, r) in results.enumerated() { XCTAssertTrue(r.ok, "reader \(i): \(r)") }
        XCTAssertEqual(try m.stats()["casfs_verify_failures_total"] ?? 0, 0)
    }

    func testConcurrentReadersOfADamagedBlobNeverSucceedWithItsBytes() throws {
        let b = try placed(256 << 20, seed: "bad")
        try flipByte(path: diskObjectPath(root: storeDir, b.digest), at: 200 << 20)
        let m = try mount(try indexedDiskConfig())
        let results = readers(m, b.digest, b.path)
        for (i, r) in results.enumerated() where i < 2 { XCTAssertFalse(r.ok, "whole reader \(i) succeeded on a damaged blob") }
        XCTAssertGreaterThanOrEqual(try m.stats()["casfs_verify_failures_total"] ?? 0, 1)
    }
}
