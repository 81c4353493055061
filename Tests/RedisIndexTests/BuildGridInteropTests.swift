import CASCore
import CASStorage
import Foundation
import Redis
import TestSupport
import XCTest

/// casfs's RedisIndex and BuildGrid's own RedisIndex (Python, from PyPI) on one
/// Redis and one disk store.
final class BuildGridInteropTests: XCTestCase {
    var server: RedisServer!
    var redis: RedisPool!
    var disk: URL!
    var venv: BuildGridVenv!

    override func setUpWithError() throws {
        venv = try BuildGridVenv.get()
        server = try RedisServer.tcp()  // BuildGrid's RedisProvider speaks TCP only
        redis = server.pool()
        disk = server.directory.appendingPathComponent("disk")
    }

    override func tearDown() {
        redis = nil
        server = nil
    }

    func casfs(prefix: String? = nil) throws -> RedisIndex {
        try RedisIndex(redis: redis, storage: DiskStorage(root: disk.path), prefix: prefix)
    }

    /// Runs operations through BuildGrid's RedisIndex; returns one JSON value per operation.
    @discardableResult
    func buildgrid(_ ops: [[Any]], prefix: String? = nil, file: StaticString = #filePath, line: UInt = #line) throws -> [Any] {
        let script = BuildGridVenv.packageRoot + "/Tests/python/buildgrid_index.py"
        var args = ["--port", String(server.port!), "--disk", disk.path]
        if let prefix { args += ["--prefix", prefix] }
        let input = String(decoding: try JSONSerialization.data(withJSONObject: ops), as: UTF8.self)
        let out = try venv.run(script: script, arguments: args, stdin: input)
        guard out.status == 0 else {
            XCTFail("BuildGrid script failed (\(out.status)):\n\(out.stderr)", file: file, line: line)
            throw TestSupportError("BuildGrid script failed")
        }
        guard let result = try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [Any] else {
            throw TestSupportError("BuildGrid script printed \(out.stdout)")
        }
        return result
    }

    func hex(_ d: Data) -> String { d.map { String(format: "%02x", $0) }.joined() }

    func testBuildGridSeesWhatCasfsCommits() throws {
        let index = try casfs()
        let a = blob("committed by casfs")
        let b = blob(bytes: 5000, seed: 9)
        let c = blob("bulk-updated by casfs")
        try index.commitWrite(a.0, DataSource(a.1))
        try index.commitWrite(b.0, DataSource(b.1))
        XCTAssertTrue(index.bulkUpdateBlobs([c]).allSatisfy { $0 == nil })
        let absent = blob("nobody wrote this").0
        let wrongSize = try Digest(hash: a.0.hash, size: a.0.size + 1)
        let r = try buildgrid([
            ["has_blob", "\(a.0)"], ["has_blob", "\(c.0)"], ["has_blob", "\(absent)"],
            ["missing_blobs", ["\(a.0)", "\(absent)", "\(b.0)", "\(wrongSize)", "\(c.0)"]],
            ["get_blob", "\(a.0)"], ["get_blob", "\(b.0)"],
            ["bulk_read_blobs", ["\(c.0)"]],
            ["total_size"], ["blob_count"],
        ])
        XCTAssertEqual(r[0] as? Bool, true)
        XCTAssertEqual(r[1] as? Bool, true)
        XCTAssertEqual(r[2] as? Bool, false)
        XCTAssertEqual(r[3] as? [String], ["\(absent)", "\(wrongSize)"])
        XCTAssertEqual(r[4] as? String, hex(a.1))
        XCTAssertEqual(r[5] as? String, hex(b.1))
        XCTAssertEqual((r[6] as? [String: String])?[c.0.hash], hex(c.1))
        let total = a.0.size + b.0.size + c.0.size
        XCTAssertEqual(r[7] as? Int, Int(total))
        XCTAssertEqual(try index.totalSize(), total)
        XCTAssertEqual(r[8] as? Int, 3)
        XCTAssertEqual(try index.blobCount(), 3)
    }

    func testCasfsSeesWhatBuildGridCommits() throws {
        let a = blob("committed by buildgrid")
        let b = blob(bytes: 3000, seed: 4)
        let c = blob("bulk by buildgrid")
        let r = try buildgrid([
            ["commit_write", "\(a.0)", hex(a.1)],
            ["commit_write", "\(b.0)", hex(b.1)],
            ["bulk_update_blobs", [["\(c.0)", hex(c.1)], ["\(a.0)", hex(a.1)]]],
            ["total_size"],
        ])
        XCTAssertEqual(r[2] as? [Int], [0, 0])
        let index = try casfs()
        for (d, data) in [a, b, c] {
            XCTAssertTrue(try index.hasBlob(d))
            XCTAssertEqual(try index.getBlob(d)?.readAll(), data)
        }
        XCTAssertEqual(try index.read(b.0, offset: 1000, length: 10), b.1.subdata(in: 1000..<1010))
        let absent = blob("absent").0
        XCTAssertEqual(try index.missingBlobs([a.0, absent, c.0]), [absent])
        XCTAssertEqual(try index.bulkReadBlobs([a.0, c.0]), [a.0: a.1, c.0: c.1])
        let total = a.0.size + b.0.size + c.0.size
        XCTAssertEqual(r[3] as? Int, Int(total))
        XCTAssertEqual(try index.totalSize(), total)
        // casfs writing a blob BuildGrid already indexed changes nothing.
        try index.commitWrite(a.0, DataSource(a.1))
        XCTAssertEqual(index.bulkUpdateBlobs([b]).map { $0 == nil }, [true])
        XCTAssertEqual(try index.totalSize(), total)
        // The LRU order includes BuildGrid's blobs.
        XCTAssertEqual(Set(try index.leastRecentDigests(limit: 10)), [a.0, b.0, c.0])
    }

    func testDeletesAcrossImplementations() throws {
        let index = try casfs()
        let mine = blob("casfs blob")
        try index.commitWrite(mine.0, DataSource(mine.1))
        let theirs = blob("buildgrid blob")
        try buildgrid([["commit_write", "\(theirs.0)", hex(theirs.1)]])
        try index.deleteBlob(theirs.0)
        XCTAssertFalse(try index.hasBlob(theirs.0))
        let r = try buildgrid([
            ["has_blob", "\(theirs.0)"], ["get_blob", "\(theirs.0)"], ["delete_blob", "\(mine.0)"], ["total_size"],
        ])
        XCTAssertEqual(r[0] as? Bool, false)
        XCTAssertTrue(r[1] is NSNull, "the bytes are gone from the shared disk store")
        XCTAssertFalse(try index.hasBlob(mine.0))
        XCTAssertNil(try index.getBlob(mine.0))
        XCTAssertEqual(r[3] as? Int, 0)
        XCTAssertEqual(try index.totalSize(), 0)
    }

    func testCasfsDeleteNBytesAgesBlobsOfBothSidesAndTotalsAgree() throws {
        let index = try casfs()
        let mineOld = blob(bytes: 100, seed: 1), mineNew = blob(bytes: 200, seed: 2)
        let theirsOld = blob(bytes: 300, seed: 3), theirsNew = blob(bytes: 400, seed: 4)
        for (d, data) in [mineOld, mineNew] { try index.commitWrite(d, DataSource(data)) }
        try buildgrid([
            ["commit_write", "\(theirsOld.0)", hex(theirsOld.1)],
            ["bulk_update_blobs", [["\(theirsNew.0)", hex(theirsNew.1)]]],
        ])
        try redis.age(index.key(mineOld.0), by: 7200)
        try redis.age(index.key(theirsOld.0), by: 7200)
        XCTAssertEqual(try index.leastRecentDigests(limit: 2).sorted(), [mineOld.0, theirsOld.0].sorted())

        let deleted = try index.deleteNBytes(10_000, rules: CleanupRules(protectBlobsAfter: Date().addingTimeInterval(-3600)))
        XCTAssertEqual(deleted, 400)
        XCTAssertFalse(FileManager.default.fileExists(atPath: try DiskStorage(root: disk.path).objectPath(theirsOld.0)))
        let r = try buildgrid([
            ["has_blob", "\(mineOld.0)"], ["has_blob", "\(theirsOld.0)"],
            ["has_blob", "\(mineNew.0)"], ["has_blob", "\(theirsNew.0)"],
            ["get_blob", "\(theirsOld.0)"], ["total_size"],
        ])
        XCTAssertEqual(r.prefix(4).compactMap { $0 as? Bool }, [false, false, true, true])
        XCTAssertTrue(r[4] is NSNull)
        XCTAssertEqual(r[5] as? Int, 600)
        XCTAssertEqual(try index.totalSize(), 600)
    }

    func testBuildGridDeleteNBytesSeesCasfsAccessTimes() throws {
        let index = try casfs()
        let old = blob(bytes: 100, seed: 7), fresh = blob(bytes: 50, seed: 8)
        for (d, data) in [old, fresh] { try index.commitWrite(d, DataSource(data)) }
        try redis.age(index.key(old.0), by: 7200)
        try redis.age(index.key(fresh.0), by: 7200)
        // casfs reads `fresh` (access-time refresh through the batcher): BuildGrid must keep it.
        let batcher = AccessTimeBatcher(index: index, flushInterval: 3600)
        batcher.record(fresh.0)
        batcher.stop()
        let protect = Date().addingTimeInterval(-3600).timeIntervalSince1970
        let r = try buildgrid([["delete_n_bytes", 10_000, false, protect], ["total_size"]])
        XCTAssertEqual(r[0] as? Int, 100)
        XCTAssertEqual(r[1] as? Int, 50)
        XCTAssertFalse(try index.hasBlob(old.0))
        XCTAssertTrue(try index.hasBlob(fresh.0))
        XCTAssertEqual(try index.totalSize(), 50)
    }

    func testNonDefaultPrefixInterop() throws {
        let index = try casfs(prefix: "casfs")
        let mine = blob(bytes: 10, seed: 1), theirs = blob(bytes: 20, seed: 2)
        try index.commitWrite(mine.0, DataSource(mine.1))
        let r = try buildgrid([
            ["has_blob", "\(mine.0)"], ["commit_write", "\(theirs.0)", hex(theirs.1)], ["total_size"],
        ], prefix: "casfs")
        XCTAssertEqual(r[0] as? Bool, true)
        XCTAssertEqual(r[2] as? Int, 30)
        XCTAssertTrue(try index.hasBlob(theirs.0))
        XCTAssertEqual(try redis.get("casfs:total_size"), "30")
        XCTAssertFalse(try redis.exists("total_size"))
        // The default-prefix index sees neither.
        let other = try buildgrid([["has_blob", "\(mine.0)"], ["total_size"]])
        XCTAssertEqual(other[0] as? Bool, false)
        XCTAssertEqual(other[1] as? Int, 0)
        // casfs ages and deletes BuildGrid's blob under the prefix (the counter key is skipped).
        try redis.age("casfs:\(theirs.0)", by: 7200)
        XCTAssertEqual(try index.deleteNBytes(1_000, rules: CleanupRules(protectBlobsAfter: Date().addingTimeInterval(-3600))), 20)
        let after = try buildgrid([["has_blob", "\(theirs.0)"], ["has_blob", "\(mine.0)"], ["total_size"]], prefix: "casfs")
        XCTAssertEqual(after[0] as? Bool, false)
        XCTAssertEqual(after[1] as? Bool, true)
        XCTAssertEqual(after[2] as? Int, 10)
    }
}
