import CASCore
import CASStorage
import Foundation
import Redis
import TestSupport
import XCTest

/// An index write that fails leaves the store and the index agreeing, with
/// a real Redis and a real disk store: refused writes take their bytes back
/// at once; a write whose SET timed out (it may still run) keeps its bytes
/// until Redis answers again and tells.
final class FailedIndexWriteTests: XCTestCase {
    func make(_ server: RedisServer) throws -> (RedisIndex, DiskStorage) {
        var c = server.config(commandTimeout: 0.5, connectTimeout: 0.5)
        c.retries = 0
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("casfs-index-\(UUID().uuidString.prefix(8))").path
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        let disk = try DiskStorage(root: dir)
        return (try RedisIndex(redis: RedisPool(c), storage: disk), disk)
    }

    func objectExists(_ disk: DiskStorage, _ d: Digest) -> Bool {
        FileManager.default.fileExists(atPath: disk.objectPath(d))
    }

    func testRefusedSetTakesTheBytesBack() throws {
        let server = try RedisServer.tcp()
        let (index, disk) = try make(server)
        let (d, data) = blob(bytes: 100_000, seed: 1)
        _ = try server.pool().command(["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        _ = try server.pool().command(["CONFIG", "SET", "maxmemory", "1"])
        XCTAssertThrowsError(try index.commitWrite(d, DataSource(data, verified: true)))
        XCTAssertFalse(objectExists(disk, d), "the refused write left its bytes")
        XCTAssertEqual(index.bulkUpdateBlobs([blob("a"), blob("b")]).compactMap { $0 }.count, 2)
        XCTAssertFalse(objectExists(disk, blob("a").0))
        XCTAssertEqual(index.unsettledCopies, 0)
        // A copy that was there before the write is not this write's to remove.
        _ = try server.pool().command(["CONFIG", "SET", "maxmemory", "0"])
        try disk.commitWrite(d, DataSource(data, verified: true))
        _ = try server.pool().command(["CONFIG", "SET", "maxmemory", "1"])
        XCTAssertThrowsError(try index.commitWrite(d, DataSource(data, verified: true)))
        XCTAssertTrue(objectExists(disk, d))
    }

    func testTimedOutSetIsSettledWhenRedisAnswersAgain() throws {
        let server = try RedisServer.tcp()
        let (index, disk) = try make(server)
        XCTAssertFalse(try index.hasBlob(blob("warm").0))
        let (d, data) = blob(bytes: 2 << 20, seed: 2)
        let pid = try XCTUnwrap(server.pid)
        kill(pid, SIGSTOP)
        XCTAssertThrowsError(try index.commitWrite(d, DataSource(data, verified: true)))
        XCTAssertTrue(objectExists(disk, d), "bytes whose SET may still run were removed")
        XCTAssertEqual(index.unsettledCopies, 1)
        kill(pid, SIGCONT)
        XCTAssertTrue(pollUntil(60) { index.unsettledCopies == 0 }, "never settled")
        let keyed = try index.hasBlob(d)
        XCTAssertEqual(objectExists(disk, d), keyed, "the store and the index disagree")
    }
}
