import CASConfig
import CASCore
import CASStorage
import Foundation
import XCTest

/// BuildGrid's composite storage tags.
final class CompositeConfigTests: XCTestCase {
    var dir = ""

    override func setUp() {
        dir = NSTemporaryDirectory() + "casfs-composite-config-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func testShardedStorage() throws {
        let stack = try CasfsConfig.parse(yaml: """
            storages:
              - !lru-storage &mem
                size: 1M
            storage: !sharded-storage
              shards:
                - name: disk-a
                  storage: !disk-storage
                    path: \(dir)/a
                - name: B2
                  storage: *mem
                - name: ""
                  storage: !disk-storage
                    path: \(dir)/c
              thread-pool-size: 3
            """)
        let s = try XCTUnwrap(stack.nodes["storage"] as? ShardedStorage)
        XCTAssertEqual(s.shards.map(\.name), ["disk-a", "B2", ""])
        XCTAssertEqual(s.fanOut.width, 3)
        XCTAssertTrue(s.shards[0].storage is VerifyingStorage, "each disk shard checks its own bytes")
        XCTAssertTrue(s.shards[1].storage is MemoryStorage)
        XCTAssertEqual((stack.nodes["storage.shards[0].storage"] as? DiskStorage)?.root, "\(dir)/a")
        XCTAssertEqual((stack.nodes["storage.shards[2].storage"] as? DiskStorage)?.root, "\(dir)/c")
        let exposition = stack.metrics.exposition()
        XCTAssertTrue(exposition.contains("node=\"storage.shards[0].storage\""), exposition)
        XCTAssertTrue(exposition.contains("node=\"storage.shards[2].storage\""), exposition)

        let plain = try CasfsConfig.parse(yaml: """
            storage: !sharded-storage
              shards:
                - name: only
                  storage: !lru-storage
                    size: 1M
            """)
        XCTAssertEqual((plain.nodes["storage"] as? ShardedStorage)?.fanOut.width, 0, "BuildGrid's default: one shard call at a time")
    }

    func testReplicatedStorage() throws {
        let stack = try CasfsConfig.parse(yaml: """
            storage: !replicated-storage
              storages:
                - !disk-storage
                  path: \(dir)/r0
                - !disk-storage
                  path: \(dir)/r1
                - !lru-storage
                  size: 1M
              replication-queue-size: 500
              replication-threads: 4
              read-replication: no
            """)
        let r = try XCTUnwrap(stack.nodes["storage"] as? ReplicatedStorage)
        XCTAssertEqual(r.replicas.count, 3)
        XCTAssertFalse(r.readReplication)
        XCTAssertEqual(r.replicationQueueSize, 500)
        XCTAssertTrue(r.replicas[0] is VerifyingStorage && r.replicas[1] is VerifyingStorage)
        XCTAssertEqual((stack.nodes["storage.storages[1]"] as? DiskStorage)?.root, "\(dir)/r1")
        XCTAssertTrue(stack.nodes["storage.storages[2]"] is MemoryStorage)
        XCTAssertTrue(stack.metrics.exposition().contains("node=\"storage.storages[0]\""))

        let defaults = try XCTUnwrap(CasfsConfig.parse(yaml: """
            storage: !replicated-storage
              storages:
                - !lru-storage
                  size: 1M
                - !lru-storage
                  size: 1M
            """).nodes["storage"] as? ReplicatedStorage)
        XCTAssertTrue(defaults.readReplication)
        XCTAssertEqual(defaults.replicationQueueSize, 0)
    }

    func testSizeDifferentiatedStorage() throws {
        let stack = try CasfsConfig.parse(yaml: """
            storage: !size-differentiated-storage
              size-limited-storages:
                - max-size: 1M
                  storage: !disk-storage
                    path: \(dir)/medium
                - max-size: "100b"
                  storage: !lru-storage
                    size: 1M
              fallback: !sharded-storage
                shards:
                  - name: x
                    storage: !disk-storage
                      path: \(dir)/x
              thread-pool-size: 2
            """)
        let s = try XCTUnwrap(stack.nodes["storage"] as? SizeDifferentiatedStorage)
        XCTAssertEqual(s.tiers.map(\.maxSize), [100, 1 << 20])
        XCTAssertTrue(s.tiers[0].storage is MemoryStorage)
        XCTAssertTrue(s.tiers[1].storage is VerifyingStorage)
        XCTAssertTrue(s.fallback is ShardedStorage)
        XCTAssertEqual(s.fanOut.width, 2)
        XCTAssertEqual((stack.nodes["storage.size-limited-storages[0].storage"] as? DiskStorage)?.root, "\(dir)/medium")
        XCTAssertEqual((stack.nodes["storage.fallback.shards[0].storage"] as? DiskStorage)?.root, "\(dir)/x")
    }

    /// A composite under a !redis-index: the index is checked as before and
    /// each disk below the composite checks its own bytes.
    func testCompositeUnderAnIndex() throws {
        let stack = try CasfsConfig.parse(yaml: """
            storage: !redis-index
              redis: !redis-connection
                host: 127.0.0.1
                port: 6399
              storage: !replicated-storage
                storages:
                  - !disk-storage
                    path: \(dir)/r0
                  - !disk-storage
                    path: \(dir)/r1
            """)
        let index = try XCTUnwrap(stack.nodes["storage"] as? RedisIndex)
        let r = try XCTUnwrap(index.storage as? ReplicatedStorage)
        XCTAssertTrue(r.replicas.allSatisfy { $0 is VerifyingStorage })
    }

    /// Each mistake names the file, the line and the key.
    func testErrorsNameFileLineAndKey() {
        let cases: [(String, String, Int, String)] = [
            ("storage: !sharded-storage\n  shards:\n    - name: a\n      storage: !lru-storage\n        size: 1M\n"
                + "    - name: a\n      storage: !lru-storage\n        size: 1M\n",
             "storage.shards[1].name", 6, "duplicate shard name 'a'"),
            ("storage: !sharded-storage\n  shards:\n    - name: a_b\n      storage: !lru-storage\n        size: 1M\n",
             "storage.shards[0].name", 3, "not a shard name"),
            ("storage: !sharded-storage\n  thread-pool-size: 2\n", "storage", 1, "missing `shards:`"),
            ("storage: !sharded-storage\n  shards: []\n", "storage.shards", 2, "at least one"),
            ("storage: !sharded-storage\n  shards: !lru-storage\n    size: 1M\n", "storage.shards", 2, "expected a list"),
            ("storage: !sharded-storage\n  shards:\n    - name: a\n", "storage.shards[0]", 3, "missing `storage:`"),
            ("storage: !sharded-storage\n  shards:\n    - storage: !lru-storage\n        size: 1M\n", "storage.shards[0]", 3,
             "missing `name:`"),
            ("storage: !sharded-storage\n  shards:\n    - name: a\n      weight: 2\n      storage: !lru-storage\n        size: 1M\n",
             "storage.shards[0].weight", 4, "unknown key"),
            ("storage: !sharded-storage\n  shards:\n    - name: a\n      storage: !lru-storage\n        size: 1M\n  thread-pool-size: -1\n",
             "storage.thread-pool-size", 6, "between"),
            ("storage: !sharded-storage\n  shards:\n    - name: a\n      storage: !lru-storage\n        size: 1X\n",
             "storage.shards[0].storage.size", 5, "not a size"),
            ("storage: !replicated-storage\n  storages:\n    - !lru-storage\n      size: 1M\n", "storage.storages", 3,
             "at least 2 entries"),
            ("storage: !replicated-storage\n  storages:\n    - !lru-storage\n      size: 1M\n    - !lru-storage\n      size: 1M\n"
                + "  replication-threads: 0\n", "storage.replication-threads", 7, "between"),
            ("storage: !replicated-storage\n  storages:\n    - !lru-storage\n      size: 1M\n    - !lru-storage\n      size: 1M\n"
                + "  read-replication: maybe\n", "storage.read-replication", 7, "true or false"),
            ("storage: !replicated-storage\n  storages:\n    - !lru-storage\n      size: 1M\n    - !s3-storage\n      bucket: b\n",
             "storage.storages[1]", 5, "not supported by casfs"),
            ("storage: !size-differentiated-storage\n  size-limited-storages:\n    - max-size: 1M\n      storage: !lru-storage\n"
                + "        size: 1M\n", "storage", 1, "missing `fallback:`"),
            ("storage: !size-differentiated-storage\n  size-limited-storages:\n    - max-size: 1X\n      storage: !lru-storage\n"
                + "        size: 1M\n  fallback: !lru-storage\n    size: 1M\n", "storage.size-limited-storages[0].max-size", 3, "not a size"),
            ("storage: !size-differentiated-storage\n  size-limited-storages:\n    - storage: !lru-storage\n        size: 1M\n"
                + "  fallback: !lru-storage\n    size: 1M\n", "storage.size-limited-storages[0]", 3, "missing `max-size:`"),
            ("storage: !size-differentiated-storage\n  fallback: !lru-storage\n    size: 1M\n", "storage", 1,
             "missing `size-limited-storages:`"),
        ]
        for (yaml, key, line, message) in cases {
            XCTAssertThrowsError(try CasfsConfig.parse(yaml: yaml, source: "c.yaml"), yaml) { e in
                let text = "\(e)"
                XCTAssertTrue(text.hasPrefix("c.yaml:\(line): \(key): "), "\(text) should start with c.yaml:\(line): \(key):")
                XCTAssertTrue(text.contains(message), "\(text) lacks \(message)")
            }
        }
    }
}
