import CASConfig
import CASCore
import XCTest

/// Nodes built from a configuration report into the stack's registry under
/// their place in the file. Nothing here connects anywhere.
final class NodeMetricsConfigTests: XCTestCase {
    func testRemoteAndRedisNodesRegisterTheirCounters() throws {
        let yaml = """
            storage: !with-cache-storage
              cache: !redis-index
                redis: !redis-connection
                  host: 127.0.0.1
                  port: 1
                storage: !lru-storage
                  size: 1M
              fallback: !remote-storage
                url: grpc://127.0.0.1:1
            """
        let stack = try CasfsConfig.parse(yaml: yaml)
        let text = stack.metrics.exposition()
        for sample in [
            #"casfs_remote_rpc_errors_total{node="storage.fallback"} 0"#,
            #"casfs_remote_rpc_retries_total{node="storage.fallback"} 0"#,
            #"casfs_redis_errors_total{node="storage.cache"} 0"#,
            #"casfs_redis_retries_total{node="storage.cache"} 0"#,
            #"casfs_redis_reconnects_total{node="storage.cache"} 0"#,
            #"casfs_redis_connections{node="storage.cache"} 0.0"#,
        ] {
            XCTAssertTrue(text.split(separator: "\n").contains { $0 == sample }, "\(sample) missing from:\n\(text)")
        }
        try stack.stop()
    }
}
