import CASCore
import Foundation
import Synchronization
import TestSupport
import XCTest

/// A write whose index write fails leaves no bytes behind in the store, and
/// never takes away bytes another writer has indexed: after every error the
/// store and the index agree (a key for every object, an object for every key).
final class StrayBytesTests: MountTestCase {
    var casfs: String { (try? casfsBinary()) ?? "casfs" }
    var extraRedis: [RedisServer] = []

    override func tearDown() {
        for m in mounts { m.unmount() }
        mounts = []
        for r in extraRedis { r.stop() }
        extraRedis = []
        super.tearDown()
    }

    /// The object files of the store (not temporaries, not proofs).
    func objects(_ store: String? = nil) -> [String] {
        let dir = (store ?? storeDir) + "/cas/objects"
        return mustSh("find \(shq(dir)) -type f 2>/dev/null | sort").split(separator: "\n").map(String.init)
    }

    func noEviction(_ r: TestRedis, full: Bool) {
        r.cli("CONFIG SET maxmemory-policy noeviction")
        r.cli("CONFIG SET maxmemory \(full ? 1 : 0)")
    }

    /// Redis out of memory under `noeviction`: `cp` fails with EIO, and
    /// `cas/objects` holds no file; `casfs put` (batched small files) too.
    /// Once Redis has room, the same writes land with their keys.
    func testRedisOutOfMemoryLeavesNoStrayObject() throws {
        let r = try startRedis()
        let config = try indexedDiskConfig()
        let m = try mount(config)
        let blobs = try (0..<3).map { try localBlob(randomData([5_000, 300_000, 3 << 20][$0], seed: 700 + UInt64($0))) }
        noEviction(r, full: true)
        XCTAssertTrue(r.cli("SET probe 1").contains("OOM"), "Redis does not refuse writes")
        for b in blobs {
            let cp = sh("cp \(shq(b.path)) \(shq(m.path(b.digest)))")
            XCTAssertFalse(cp.ok, "cp succeeded with Redis out of memory")
            XCTAssertTrue(cp.stderr.contains("Input/output error"), cp.stderr)
        }
        XCTAssertEqual(objects(), [], "the failed writes left objects in the store")
        XCTAssertTrue(m.log.contains("its bytes were taken out of the store again"), m.log)
        // The batch path: casfs put of small files.
        let dir = tmp + "/put"
        for i in 0..<20 { _ = try writeLocalBlob(randomData(1000 + i, seed: 800 + UInt64(i)), in: dir) }
        let cfg = tmp + "/cmd.yaml"
        try config.write(toFile: cfg, atomically: true, encoding: .utf8)
        let put = sh("\(shq(casfs)) put --quiet --config \(shq(cfg)) \(shq(dir))")
        XCTAssertFalse(put.ok, "put succeeded with Redis out of memory: \(put)")
        XCTAssertEqual(objects(), [], "the failed put left objects in the store")
        XCTAssertEqual(r.cli("--scan --pattern 'A:*'"), "")
        noEviction(r, full: false)
        for b in blobs { mustSh("cp \(shq(b.path)) \(shq(m.path(b.digest)))") }
        mustSh("\(shq(casfs)) put --quiet --config \(shq(cfg)) \(shq(dir))")
        XCTAssertEqual(objects().count, 23)
        for b in blobs { XCTAssertTrue(try indexed(b.digest)) }
        XCTAssertEqual(r.cli("--scan --pattern 'A:*'").split(separator: "\n").count, 23)
    }

    /// Deferred writes to an index whose Redis is out of memory: each failed
    /// send takes its bytes back out of the store (the journal keeps them and
    /// the blob stays readable); once Redis has room, the send lands.
    func testDeferredSendsToAFullRedisLeaveNothingBehind() throws {
        let r = try startRedis()
        let config = """
            storage: !with-cache-storage
              cache: !lru-storage
                size: 64M
              fallback: !redis-index
                redis: !redis-connection
                  host: 127.0.0.1
                  port: \(r.port)
                storage: !disk-storage
                  path: \(storeDir)
              defer-fallback-writes: true
              journal: \(tmp)/journal
            mount:
              writable: true

            """
        let m = try mount(config)
        let b = try localBlob(randomData(2 << 20, seed: 900))
        noEviction(r, full: true)
        mustSh("cp \(shq(b.path)) \(shq(m.path(b.digest)))")
        XCTAssertTrue(pollUntil(60) { ((try? m.stats())?["casfs_deferred_write_failures_total"] ?? 0) >= 2 }, "no failed sends")
        XCTAssertEqual(objects(), [], "a failed send left its bytes in the store")
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(b.digest))) | cut -c1-64"), b.digest.hash + "\n")
        noEviction(r, full: false)
        XCTAssertTrue(pollUntil(120) { (try? self.indexed(b.digest)) == true }, "the deferred write never landed")
        XCTAssertEqual(objects().count, 1)
    }

    /// Two mounts on one store: `a` indexes through a read-only replica (its
    /// SETs fail), `b` through the master. They write the same blobs at the
    /// same time, over and over. `b`'s writes always succeed and stay: `a`
    /// never takes away a copy `b` indexed, even one `b` found in place and
    /// kept (where `a`'s copy landed first). Blobs only `a` wrote leave
    /// nothing behind.
    func testFailedIndexWriteNeverRemovesAnotherWritersCopy() throws {
        let master = try startRedis()
        let replica = try RedisServer.tcp(arguments: ["--replicaof", "127.0.0.1", "\(master.port)"])
        extraRedis.append(replica)
        let replicaPort = try XCTUnwrap(replica.port)
        XCTAssertTrue(pollUntil(30) { runShell("redis-cli -p \(replicaPort) INFO replication").stdout.contains("master_link_status:up") })
        let a = try mount(indexedDiskConfig(port: replicaPort, store: storeDir), name: "a")
        let b = try mount(indexedDiskConfig(port: master.port, store: storeDir), name: "b")
        let blobs = try (0..<40).map { try localBlob(randomData(64 << 10 + $0 * 1024, seed: 1000 + UInt64($0))) }
        let group = DispatchGroup()
        let results = Mutex<[Int: String]>([:])  // b's failures by blob
        for (i, blob) in blobs.enumerated() {
            for m in [a, b] {
                let path = blob.path, target = m.path(blob.digest), isB = m === b
                group.enter()
                DispatchQueue.global().async {
                    let r = runShell("cp \(shq(path)) \(shq(target))")
                    if isB && !r.ok { results.withLock { $0[i] = "\(r)" } }
                    group.leave()
                }
            }
            if i % 4 == 3 { group.wait() }
        }
        group.wait()
        let failures = results.withLock { $0 }
        for (i, blob) in blobs.enumerated() {
            XCTAssertNil(failures[i], "b's write of \(blob.digest) failed")
            XCTAssertTrue(try indexed(blob.digest), "b's write of \(blob.digest) is not indexed")
            XCTAssertTrue(FileManager.default.fileExists(atPath: diskObjectPath(root: storeDir, blob.digest)),
                          "\(blob.digest) is indexed but its bytes are gone")
        }
        // a alone: nothing stored, nothing left.
        let lone = try (0..<5).map { try localBlob(randomData(100_000 + $0, seed: 1100 + UInt64($0))) }
        for blob in lone {
            XCTAssertFalse(sh("cp \(shq(blob.path)) \(shq(a.path(blob.digest)))").ok)
            XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: storeDir, blob.digest)), "stray bytes of \(blob.digest)")
        }
        XCTAssertEqual(objects().count, blobs.count)
        let cfg = tmp + "/cmd.yaml"
        try indexedDiskConfig(port: master.port, store: storeDir).write(toFile: cfg, atomically: true, encoding: .utf8)
        let reindex = sh("\(shq(casfs)) reindex --dry-run --config \(shq(cfg))")
        XCTAssertTrue(reindex.stdout.contains("would add 0 blobs"), "\(reindex)")
        XCTAssertTrue(reindex.stdout.contains("would drop 0 entries"), "\(reindex)")
    }
}
