import CASCore
import CASStorage
import Foundation
import Redis
import TestSupport
import XCTest

final class RedisIndexRebuildTests: XCTestCase {
    func testAddToIndexStreamsSetNXAndCountsOnlyNewEntries() throws {
        for prefix in [nil, "p"] as [String?] {
            let server = try RedisServer.unixSocket()
            let redis = server.pool()
            let index = try RedisIndex(redis: redis, storage: FakeStorage(), prefix: prefix)
            // Enough commands for several 64 KiB chunks of the streamed pipeline.
            let digests = (0..<2_000).map { blob("blob \($0) of \(prefix ?? "A")").0 }
            let already = Array(digests[..<10])
            XCTAssertEqual(try index.addToIndex(already), 10)
            let alreadySize = already.reduce(0) { $0 + $1.size }
            XCTAssertEqual(try index.totalSize(), alreadySize)

            XCTAssertEqual(try index.addToIndex(digests), digests.count - 10)
            XCTAssertEqual(try index.totalSize(), digests.reduce(0) { $0 + $1.size })
            XCTAssertEqual(try index.blobCount(), Int64(digests.count))
            for d in [digests[0], digests[1_234], digests[1_999]] {
                let k: String = index.key(d)
                let value: String? = try redis.get(k)
                XCTAssertEqual(value, "1")
                let ttl: Int64 = try redis.ttl(k)
                XCTAssertGreaterThan(ttl, RedisIndex.ttlSeconds - 10)
            }
            XCTAssertEqual(try index.addToIndex(digests), 0)
            XCTAssertEqual(try index.addToIndex([]), 0)
        }
    }

    func testAddToIndexWithDeadRedisThrows() throws {
        let server = try RedisServer.unixSocket()
        let redis = RedisPool(server.config(commandTimeout: 0.5, connectTimeout: 0.5))
        let index = try RedisIndex(redis: redis, storage: FakeStorage())
        server.stop()
        XCTAssertThrowsError(try index.addToIndex([blob("x").0]))
    }
}
