import CASCore
import Foundation
import RemoteCAS
import TestSupport
import XCTest

/// Failed calls and retries of a remote CAS, counted in its node's scope,
/// against a live BuildGrid that goes away.
final class RemoteMetricsTests: RemoteTestCase {
    func testFailedCallsAndRetriesAreCountedAndAbsenceIsNot() throws {
        let metrics = Metrics()
        let scope = MetricScope(metrics, node: "storage.fallback")
        let remote = try RemoteStorage(url: server.url, requestTimeout: 10, retries: 2, maxBackoff: 0, metrics: scope)
        let errors = { scope.value(MetricCatalog.remoteErrors) }
        let retries = { scope.value(MetricCatalog.remoteRetries) }

        let data = randomData(3000, seed: 71)
        let d = Digest.of(data)
        let large = Digest.of(randomData(9 << 20, seed: 72))
        // Absent blobs, small and large (NOT_FOUND from ByteStream): answers, not errors.
        XCTAssertNil(try remote.getBlob(d))
        XCTAssertNil(try remote.getBlob(large))
        XCTAssertNil(try remote.read(large, offset: 0, length: 10))
        try remote.commitWrite(d, DataSource(data))
        XCTAssertEqual(try remote.getBlob(d)?.readAll(), data)
        XCTAssertEqual(errors(), 0)
        XCTAssertEqual(retries(), 0)

        server.stop()
        XCTAssertThrowsError(try remote.missingBlobs([d]))
        XCTAssertEqual(errors(), 1, "one call failed")
        XCTAssertEqual(retries(), 2, "after its two retries")
        XCTAssertTrue(metrics.exposition().contains("casfs_remote_rpc_retries_total{node=\"storage.fallback\"} 2\n"))
        XCTAssertTrue(metrics.exposition().contains("casfs_remote_rpc_errors_total{node=\"storage.fallback\"} 1\n"))
    }
}
