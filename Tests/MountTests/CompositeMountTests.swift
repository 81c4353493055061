import CASCore
import CASStorage
import Foundation
import TestSupport
import XCTest

/// BuildGrid's composite storages under a real mount, driven by shell tools.
final class CompositeMountTests: MountTestCase {
    func dir(_ name: String) -> String { tmp + "/" + name }

    func hasObject(_ root: String, _ d: Digest) -> Bool {
        FileManager.default.fileExists(atPath: diskObjectPath(root: root, d))
    }

    /// Copies local files in through the mount.
    func copyIn(_ blobs: [(path: String, digest: Digest)], _ m: CasfsMount) {
        for b in blobs { mustSh("cp \(shq(b.path)) \(shq(m.path(b.digest)))") }
    }

    /// Reads every blob back through a fresh mount (nothing in the page cache).
    func assertReadBack(_ blobs: [(path: String, digest: Digest)], _ m: CasfsMount,
                        file: StaticString = #filePath, line: UInt = #line) throws {
        m.unmount()
        try m.mount()
        for b in blobs {
            XCTAssertEqual(mustSh("cmp \(shq(b.path)) \(shq(m.path(b.digest))) && echo same"), "same\n",
                           "\(b.digest)", file: file, line: line)
        }
    }

    // MARK: !sharded-storage

    /// The shard BuildGrid picks: lowest MurmurHash3 of `name TAB hash`,
    /// the first listed on a tie.
    func expectedShard(_ names: [String], _ d: Digest) -> String {
        var best = names[0]
        var bestScore = murmurHash3x86_32(names[0] + "\t" + d.hash)
        for name in names.dropFirst() {
            let score = murmurHash3x86_32(name + "\t" + d.hash)
            if score < bestScore { (best, bestScore) = (name, score) }
        }
        return best
    }

    /// BuildGrid's own ShardedStorage, asked where each digest goes.
    func buildGridShards(_ names: [String], _ digests: [Digest]) throws -> [String] {
        let code = """
            import sys
            from buildgrid.server.cas.storage.sharded import ShardedStorage
            from buildgrid.server.cas.storage.lru_memory_cache import LRUMemoryCache
            from buildgrid._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Digest
            stores = {n: LRUMemoryCache(1024) for n in sys.argv[1:]}
            names = {id(s): n for n, s in stores.items()}
            sharded = ShardedStorage(stores)
            for line in sys.stdin:
                h, size = line.split()
                print(names[id(sharded._storage_from_digest(Digest(hash=h, size_bytes=int(size))))])
            """
        let out = try BuildGridVenv.get().run(code: code, arguments: names,
                                               stdin: digests.map { "\($0.hash) \($0.size)\n" }.joined())
        guard out.status == 0 else { throw MountError("BuildGrid's ShardedStorage failed: \(out.stderr)") }
        return out.stdout.split(separator: "\n").map(String.init)
    }

    func testShardedStoragePlacesBlobsAsBuildGridDoes() throws {
        let names = ["shard-a", "shard-b"]
        let m = try mount("""
            storage: !sharded-storage
              shards:
                - name: \(names[0])
                  storage: !disk-storage
                    path: \(dir(names[0]))
                - name: \(names[1])
                  storage: !disk-storage
                    path: \(dir(names[1]))
              thread-pool-size: 2
            mount:
              writable: true

            """)
        let blobs = try (0..<16).map { i in try localBlob(randomData(1000 + i * 7919, seed: 100 + UInt64(i))) }
        copyIn(blobs, m)

        var perShard: [String: Int] = [:]
        for b in blobs {
            let shard = expectedShard(names, b.digest)
            perShard[shard, default: 0] += 1
            for name in names {
                XCTAssertEqual(hasObject(dir(name), b.digest), name == shard, "\(b.digest) should be in \(shard) only")
            }
        }
        XCTAssertEqual(perShard.count, 2, "the blobs use both shards: \(perShard)")
        XCTAssertEqual(try buildGridShards(names, blobs.map(\.digest)), blobs.map { expectedShard(names, $0.digest) },
                       "BuildGrid picks the same shards")
        try assertReadBack(blobs, m)
    }

    // MARK: !replicated-storage

    func testReplicatedStorageWritesEverywhereAndRepairsOnRead() throws {
        let replicas = [dir("replica-0"), dir("replica-1")]
        let m = try mount("""
            storage: !replicated-storage
              storages:
                - !disk-storage
                  path: \(replicas[0])
                - !disk-storage
                  path: \(replicas[1])
            mount:
              writable: true

            """)
        let blobs = try (0..<4).map { i in try localBlob(randomData(50_000 + i, seed: 200 + UInt64(i))) }
        copyIn(blobs, m)
        for b in blobs { XCTAssertTrue(replicas.allSatisfy { hasObject($0, b.digest) }, "\(b.digest) in both replicas") }

        m.unmount()
        // Lost from the first replica, lost from the second, and a copy with
        // the right length but wrong bytes in the first.
        try FileManager.default.removeItem(atPath: diskObjectPath(root: replicas[0], blobs[0].digest))
        try FileManager.default.removeItem(atPath: diskObjectPath(root: replicas[1], blobs[1].digest))
        let corrupt = diskObjectPath(root: replicas[0], blobs[2].digest)
        var bad = try Data(contentsOf: URL(fileURLWithPath: corrupt))
        bad[bad.startIndex + 10] ^= 0xff
        try FileManager.default.removeItem(atPath: corrupt)
        try bad.write(to: URL(fileURLWithPath: corrupt))

        try m.mount()
        for b in blobs.prefix(3) {
            XCTAssertEqual(mustSh("cmp \(shq(b.path)) \(shq(m.path(b.digest))) && echo same"), "same\n", "\(b.digest)")
        }
        let repaired = pollUntil(60) {
            self.hasObject(replicas[0], blobs[0].digest) && self.hasObject(replicas[1], blobs[1].digest)
                && (try? Data(contentsOf: URL(fileURLWithPath: corrupt))) == (try? Data(contentsOf: URL(fileURLWithPath: blobs[2].path)))
        }
        XCTAssertTrue(repaired, "replicas repaired by the reads; log:\n\(m.log)")
        for (root, b) in [(replicas[0], blobs[0]), (replicas[1], blobs[1])] {
            XCTAssertEqual(mustSh("cmp \(shq(b.path)) \(shq(diskObjectPath(root: root, b.digest))) && echo same"), "same\n")
        }
        XCTAssertGreaterThanOrEqual(try m.stats()["casfs_replica_repairs_total"] ?? 0, 3)
    }

    // MARK: !size-differentiated-storage

    func testSizeDifferentiatedStoragePlacesBlobsBySize() throws {
        let (small, medium, large) = (dir("small"), dir("medium"), dir("large"))
        let m = try mount("""
            storage: !size-differentiated-storage
              size-limited-storages:
                - max-size: 64K
                  storage: !disk-storage
                    path: \(medium)
                - max-size: 1K
                  storage: !disk-storage
                    path: \(small)
              fallback: !disk-storage
                path: \(large)
            mount:
              writable: true

            """)
        let sizes: [(Int, String)] = [(100, small), (1023, small), (1024, medium), (5000, medium), (65535, medium),
                                      (65536, large), (1 << 20, large)]
        let blobs = try sizes.enumerated().map { i, s in try localBlob(randomData(s.0, seed: 300 + UInt64(i))) }
        copyIn(blobs, m)
        for (b, (size, expected)) in zip(blobs, sizes) {
            for root in [small, medium, large] {
                XCTAssertEqual(hasObject(root, b.digest), root == expected, "a blob of \(size) bytes belongs in \(expected)")
            }
        }
        try assertReadBack(blobs, m)
    }
}
