import CASCore
import CASStorage
import Foundation
import Redis
import TestSupport
import XCTest

/// The pool's failures, retries and reconnects, exported as samples of the
/// index node, against a real redis-server that drops its clients and dies.
final class RedisIndexMetricsTests: XCTestCase {
    func testFailuresRetriesAndReconnectsReachTheIndexNode() throws {
        let server = try RedisServer.unixSocket()
        let pool = server.pool()
        let metrics = Metrics()
        let scope = MetricScope(metrics, node: "storage.fallback")
        let index = try RedisIndex(redis: pool, storage: FakeStorage(), metrics: scope)
        let errors = { scope.value(MetricCatalog.redisErrors) }
        let retries = { scope.value(MetricCatalog.redisRetries) }
        let reconnects = { scope.value(MetricCatalog.redisReconnects) }

        let (d, data) = blob("metrics")
        try index.commitWrite(d, DataSource(data))
        XCTAssertEqual(scope.value(MetricCatalog.redisConnections), 1)
        XCTAssertEqual(errors(), 0)
        XCTAssertEqual(retries(), 0)
        XCTAssertEqual(reconnects(), 0)
        // Labelled with the node, as every storage sample.
        XCTAssertTrue(metrics.exposition().contains("casfs_redis_reconnects_total{node=\"storage.fallback\"} 0\n"))

        // The server drops every client (but the one asking): the index's
        // next call reconnects, once, and succeeds.
        let admin = server.pool()
        XCTAssertGreaterThanOrEqual(try admin.command("CLIENT", "KILL", "TYPE", "normal").integerValue(), 1)
        XCTAssertTrue(try index.hasBlob(d))
        XCTAssertEqual(reconnects(), 1)

        // An error reply reaches the index alone, which counts it.
        _ = try admin.command("DEL", "total_size")
        _ = try admin.command("LPUSH", "total_size", "not a number")
        let errorsBefore = errors()
        XCTAssertThrowsError(try index.totalSize())
        XCTAssertEqual(errors(), errorsBefore + 1)
        XCTAssertEqual(retries(), 0, "an error reply is not retried")

        // The server is gone: each attempt fails, and all but the last are retried.
        let (e0, r0) = (errors(), retries())
        server.stop()
        XCTAssertThrowsError(try index.hasBlob(d))
        XCTAssertEqual(errors() - e0, Double(pool.config.retries + 1))
        XCTAssertEqual(retries() - r0, Double(pool.config.retries))

        // Back: the next connection is a reconnect.
        try server.start()
        let reconnectsBefore = reconnects()
        XCTAssertFalse(try eventually { try index.hasBlob(d) }, "the restarted server lost its data")
        XCTAssertEqual(reconnects(), reconnectsBefore + 1)
        // Counters never go back: a second export adds nothing new.
        let text = metrics.exposition()
        XCTAssertEqual(metrics.exposition(), text)
    }
}
