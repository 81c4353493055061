import CASCore
import Foundation
import TestSupport
import XCTest

/// casfs mounts whose fallback is a live BuildGrid server, driven by shell tools.
final class RemoteMountTests: RemoteTestCase {
    override func setUpWithError() throws {
        try requireFuse()
        _ = try casfsBinary()
        try super.setUpWithError()
    }

    func testBlobUploadedToBuildGridIsReadableThroughTheMount() throws {
        let small = try localFile(randomData(10_000, seed: 1))
        let large = try localFile(randomData(7 << 20, seed: 2))
        try uploadWithBuildGridClient([small.path, large.path])
        let m = try mount(remoteConfig())
        mustSh("cmp \(shq(small.path)) \(shq(m.path(small.digest)))")
        mustSh("cmp \(shq(large.path)) \(shq(m.path(large.digest)))")
        let absent = Digest.of(Data("not there".utf8))
        let r = runShell("cat \(shq(m.path(absent)))")
        XCTAssertFalse(r.ok)
        XCTAssertTrue(r.stderr.contains("No such file"), r.stderr)
    }

    func testBlobCopiedIntoTheMountIsInBuildGrid() throws {
        let small = try localFile(randomData(2000, seed: 3))
        let large = try localFile(randomData(6 << 20 + 3, seed: 4))
        let m = try mount(remoteConfig(writable: true))
        mustSh("cp \(shq(small.path)) \(shq(m.path(small.digest)))")
        mustSh("cp \(shq(large.path)) \(shq(m.path(large.digest)))")
        XCTAssertEqual(try missingPerBuildGrid([small.digest, large.digest]), [])
        XCTAssertEqual(try readPerBuildGrid(small.digest), try Data(contentsOf: URL(fileURLWithPath: small.path)))
        XCTAssertEqual(try readPerBuildGrid(large.digest), try Data(contentsOf: URL(fileURLWithPath: large.path)))
    }

    func testNamedInstanceThroughTheMount() throws {
        let up = try localFile(randomData(5 << 20, seed: 5))
        try uploadWithBuildGridClient([up.path], instance: "main")
        let m = try mount(remoteConfig(writable: true, instance: "main"))
        mustSh("cmp \(shq(up.path)) \(shq(m.path(up.digest)))")
        let down = try localFile(randomData(4000, seed: 6))
        mustSh("cp \(shq(down.path)) \(shq(m.path(down.digest)))")
        XCTAssertEqual(try missingPerBuildGrid([down.digest], instance: "main"), [])
        XCTAssertEqual(try readPerBuildGrid(down.digest, instance: "main"), try Data(contentsOf: URL(fileURLWithPath: down.path)))
    }

    func testLargeBlobRangedReads() throws {
        let size = 256 << 20
        let data = randomData(size, seed: 7)
        let f = try localFile(data)
        try uploadWithBuildGridClient([f.path])
        // The cache is smaller than the blob: ranges are served by ByteStream
        // reads with read_offset/read_limit after one verified fetch.
        let m = try mount(remoteConfig(cache: "!lru-storage\n    size: 32M"))
        for (skip, count) in [(0, 1), (1, 3), (100, 7), (255, 1), (1000, 5)] {  // in MiB
            let got = runShell("dd if=\(shq(m.path(f.digest))) bs=1M skip=\(skip) count=\(count) status=none | sha256sum")
            let want = runShell("dd if=\(shq(f.path)) bs=1M skip=\(skip) count=\(count) status=none | sha256sum")
            XCTAssertTrue(got.ok, "\(got)")
            XCTAssertEqual(got.stdout, want.stdout, "dd skip=\(skip) count=\(count)")
        }
        mustSh("cmp \(shq(f.path)) \(shq(m.path(f.digest)))")
    }

    func testTwoThousandSmallBlobsViaPut() throws {
        let dir = tmp + "/many"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var digests: [Digest] = []
        for i in 0..<2000 {
            let data = randomData(100 + i % 3000, seed: 1000 + UInt64(i))
            digests.append(Digest.of(data))
            try data.write(to: URL(fileURLWithPath: "\(dir)/f\(i)"))
        }
        let config = tmp + "/put.yaml"
        try """
            storage: !remote-storage
              url: \(server.url)
              request-timeout: 30s

            """.write(toFile: config, atomically: true, encoding: .utf8)
        let r = runShell("\(shq(try casfsBinary())) put --quiet --config \(shq(config)) \(shq(dir))")
        XCTAssertTrue(r.ok, "\(r)")
        XCTAssertEqual(r.stdout.split(separator: "\n").count, 2000)
        var missing: [String] = []
        for start in stride(from: 0, to: digests.count, by: 500) {
            missing += try missingPerBuildGrid(Array(digests[start..<min(start + 500, digests.count)]))
        }
        XCTAssertEqual(missing, [])
    }

    func testServerStoppedAndRestarted() throws {
        let a = try localFile(randomData(3 << 20, seed: 10))
        let b = try localFile(randomData(50_000, seed: 11))
        try uploadWithBuildGridClient([a.path, b.path])
        let m = try mount(remoteConfig(cache: "!disk-storage\n    path: \(tmp)/cache", timeout: "5s", retries: 2))
        mustSh("cmp \(shq(a.path)) \(shq(m.path(a.digest)))")  // now cached

        server.stop()
        // Cached: still readable. Uncached: EIO, and the command returns.
        // (`timeout` only guards the test run against a hang.)
        mustSh("cmp \(shq(a.path)) \(shq(m.path(a.digest)))")
        let r = runShell("timeout 120 cat \(shq(m.path(b.digest))) > /dev/null")
        XCTAssertNotEqual(r.status, 124, "cat hung with the server down")
        XCTAssertFalse(r.ok, "uncached read succeeded with the server down")
        XCTAssertTrue(r.stderr.contains("Input/output error"), r.stderr)
        XCTAssertTrue(m.isRunning)

        try server.start()
        mustSh("cmp \(shq(b.path)) \(shq(m.path(b.digest)))")
    }

    func testWrongBytesFromTheServerAreCaught() throws {
        let data = randomData(200_000, seed: 12)
        let f = try localFile(data)
        try uploadWithBuildGridClient([f.path])
        // Corrupt BuildGrid's stored copy (same length): it serves it as is.
        let obj = diskObjectPath(root: server.storePath, f.digest)
        var bad = data
        bad[100] ^= 0xFF
        try bad.write(to: URL(fileURLWithPath: obj))
        XCTAssertEqual(try readPerBuildGrid(f.digest), bad, "BuildGrid should serve the corrupt copy")

        let cacheDir = tmp + "/cache"
        let m = try mount(remoteConfig(cache: "!disk-storage\n    path: \(cacheDir)"))
        let r = runShell("cat \(shq(m.path(f.digest))) > /dev/null")
        XCTAssertFalse(r.ok)
        XCTAssertTrue(r.stderr.contains("Input/output error"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: cacheDir, f.digest)), "corrupt bytes were cached")
    }
}
