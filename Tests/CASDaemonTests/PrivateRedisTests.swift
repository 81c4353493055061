import CASConfig
import CASCore
import CASDaemon
import CASStorage
import Foundation
import XCTest

/// The zero-config mount's private Redis, driven directly.
final class PrivateRedisTests: XCTestCase {
    /// The private Redis persists the index across restarts, and a lost index is rebuilt from the disk store.
    func testPrivateRedisPersistsAndIndexIsRebuilt() throws {
        let data = NSTemporaryDirectory() + "casfs-default-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: data) }
        let redis = DefaultConfig.privateRedis(dataDirectory: data)
        XCTAssertFalse(redis.isRunning())
        try redis.start()
        XCTAssertTrue(redis.isRunning())
        let blobs = (0..<5).map { Data("default blob \($0)".utf8) }
        do {
            let c = try DefaultConfig.make(dataDirectory: data, redis: redis)
            for b in blobs { try c.storage.commitWrite(Digest.of(b), DataSource(b)) }
            XCTAssertEqual(try c.index?.blobCount(), 5)
            try c.storage.stop()
        }
        let pid = try XCTUnwrap(redis.serverPID())
        redis.stop()
        XCTAssertFalse(redis.isRunning())
        XCTAssertNotEqual(kill(pid, 0), 0, "the private redis-server exited")

        // Restart: the append-only file brings the index back as it was.
        try redis.start()
        do {
            let c = try DefaultConfig.make(dataDirectory: data, redis: redis)
            XCTAssertEqual(try c.index?.blobCount(), 5)
            XCTAssertEqual(try c.storage.missingBlobs(blobs.map { Digest.of($0) }), [])
        }
        redis.stop()

        // Lose Redis's data: the index is rebuilt from the disk store at start.
        for f in try FileManager.default.contentsOfDirectory(atPath: data + "/redis")
        where f.hasPrefix("appendonly") || f.hasSuffix(".rdb") {
            try FileManager.default.removeItem(atPath: data + "/redis/" + f)
        }
        try redis.start()
        defer { redis.stop() }
        let c = try DefaultConfig.make(dataDirectory: data, redis: redis)
        XCTAssertEqual(try c.index?.blobCount(), 5)
        XCTAssertEqual(try c.index?.totalSize(), Int64(blobs.map(\.count).reduce(0, +)))
        XCTAssertEqual(try c.storage.getBlob(Digest.of(blobs[3]))?.readAll(), blobs[3])
        let index = try XCTUnwrap(c.index)
        XCTAssertEqual(try index.reconcile(), ReconcileReport(totalBefore: 70, totalAfter: 70, blobs: 5),
                       "a complete index is left as it is")
    }

    func testMissingRedisServerIsAClearError() throws {
        let dir = NSTemporaryDirectory() + "casfs-noredis-\(UUID().uuidString)"
        let redis = PrivateRedis(directory: dir, executable: "/nonexistent/redis-server")
        XCTAssertThrowsError(try redis.start()) { e in
            XCTAssertTrue("\(e)".contains("redis-server is not installed"), "\(e)")
            XCTAssertTrue("\(e)".contains("apt-get install redis-server"), "\(e)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/redis.sock"))
    }
}
