import CASCore
import Foundation
import TestSupport
import XCTest

/// A writable casfs mount whose `!redis-index` finds its Redis through Redis
/// Sentinel (a real master, replica and sentinel on loopback), driven with
/// shell tools through a requested failover and through a master killed with
/// SIGKILL in the middle of a loop of copies.
final class SentinelMountTests: MountTestCase {
    var cluster: RedisSentinelCluster?

    override func tearDown() {
        super.tearDown()  // unmounts first
        cluster = nil
    }

    func startCluster() throws -> RedisSentinelCluster {
        let c = try RedisSentinelCluster(replicas: 1)
        cluster = c
        return c
    }

    /// `!redis-index` over `!disk-storage`; the connection names the
    /// sentinel by host and port and the master by name, as in BuildGrid.
    func sentinelConfig(_ c: RedisSentinelCluster) -> String {
        """
        storage: !redis-index
          redis: !redis-connection
            host: 127.0.0.1
            port: \(c.sentinelPort)
            sentinel-master-name: \(RedisSentinelCluster.masterName)
            connect-timeout: 1s
            command-timeout: 2s
          storage: !disk-storage
            path: \(storeDir)
        mount:
          writable: true

        """
    }

    /// `cp` of a local file into the mount, bounded by `timeout` only as a
    /// hang guard (status 124 means it hung).
    func copyIn(_ blob: (path: String, digest: Digest), _ m: CasfsMount) -> ShellResult {
        runShell("timeout 120 cp \(shq(blob.path)) \(shq(m.path(blob.digest)))")
    }

    func blobs(_ count: Int, seed: UInt64) throws -> [(path: String, digest: Digest)] {
        try (0..<count).map { i in
            try localBlob(randomData(100 + (Int(seed) * 7919 + i * 4099) % 60_000, seed: seed * 10_000 + UInt64(i)))
        }
    }

    /// The names `ls` shows in the mount's /sha256.
    func listed(_ m: CasfsMount) -> Set<String> {
        let r = runShell("timeout 120 ls \(shq(m.sha256))")
        XCTAssertTrue(r.ok, "ls: \(r)")
        return Set(r.stdout.split(separator: "\n").map(String.init))
    }

    /// `casfs stat --config --json`: the index's blob count and total size.
    func stat(_ m: CasfsMount) throws -> (count: Int64, total: Int64) {
        let r = runShell("timeout 120 \(shq(try casfsBinary())) stat --config \(shq(m.configPath)) --json")
        guard r.ok, let obj = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
              let n = (obj["blob_count"] as? NSNumber)?.int64Value, let t = (obj["total_size"] as? NSNumber)?.int64Value else {
            throw MountError("casfs stat failed: \(r)")
        }
        return (n, t)
    }

    /// True if the Redis server at `port` (asked directly) holds the index key of `d`.
    func indexed(_ d: Digest, onPort port: Int) -> Bool {
        runShell("redis-cli -p \(port) EXISTS \(shq("A:\(d)"))").stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "1"
    }

    func assertListedIndexedReadable(_ blobs: [(path: String, digest: Digest)], _ m: CasfsMount, masterPort: Int,
                                     file: StaticString = #filePath, line: UInt = #line) {
        let names = listed(m)
        for b in blobs {
            XCTAssertTrue(names.contains(b.digest.description), "\(b.digest) is not listed", file: file, line: line)
            XCTAssertTrue(indexed(b.digest, onPort: masterPort), "\(b.digest) is not indexed on the master at \(masterPort)",
                          file: file, line: line)
            let r = runShell("timeout 120 cmp \(shq(b.path)) \(shq(m.path(b.digest)))")
            XCTAssertTrue(r.ok, "\(b.digest) does not read back: \(r)", file: file, line: line)
        }
    }

    func testRequestedFailoverKeepsEveryBlobListedReadableAndCounted() throws {
        let c = try startCluster()
        let first = c.servers[0].port!, second = c.servers[1].port!
        let m = try mount(sentinelConfig(c))

        let before = try blobs(25, seed: 1)
        for b in before {
            let r = copyIn(b, m)
            XCTAssertTrue(r.ok, "cp \(b.digest): \(r)")
        }
        for b in before { XCTAssertTrue(indexed(b.digest, onPort: first), "\(b.digest) on the first master") }

        try c.failover()
        try c.waitForMaster(port: second)

        // The mount's connections still point at the demoted master: the
        // first writes after the failover must find the new one.
        let after = try blobs(25, seed: 2)
        for b in after {
            let r = copyIn(b, m)
            XCTAssertTrue(r.ok, "cp \(b.digest) after the failover: \(r)")
        }
        let all = before + after
        assertListedIndexedReadable(all, m, masterPort: second)
        XCTAssertEqual(listed(m).count, all.count, "nothing else is listed")
        let s = try stat(m)
        XCTAssertEqual(s.count, Int64(all.count))
        XCTAssertEqual(s.total, all.reduce(Int64(0)) { $0 + $1.digest.size })
        XCTAssertTrue(m.isRunning)
    }

    func testMasterKilledMidCopiesLosesNoCopiedBlob() throws {
        let c = try startCluster()
        let first = c.servers[0].port!, second = c.servers[1].port!
        let m = try mount(sentinelConfig(c))
        // Move the master once, so that the one killed is the promoted one.
        try c.failover()
        try c.waitForMaster(port: second)

        let pending = try blobs(600, seed: 3)
        let loop = CopyLoop()
        let finished = DispatchSemaphore(value: 0)
        let commands = pending.map { b in (b, "timeout 120 cp \(shq(b.path)) \(shq(m.path(b.digest)))") }
        Thread.detachNewThread {
            for (b, command) in commands {
                if loop.stopRequested { break }
                loop.record(b, runShell(command))
            }
            finished.signal()
        }
        try RedisSentinelCluster.poll("30 copies before the kill", limit: 300) { loop.succeeded.count >= 30 }
        c.servers[1].stop()  // SIGKILL of the master
        let atKill = loop.attempts
        try RedisSentinelCluster.poll("the sentinel to promote 127.0.0.1:\(first)", limit: 120) { try c.masterPort() == first }
        // Copies go on after the failover window.
        try RedisSentinelCluster.poll("30 more copies after the failover", limit: 300) {
            loop.succeededAfter(attempt: atKill) >= 30 || loop.attempts == pending.count
        }
        loop.stop()
        XCTAssertEqual(finished.wait(timeout: .now() + 300), .success, "the copy loop did not stop")

        XCTAssertEqual(loop.hung, [], "copies that hung")
        XCTAssertGreaterThanOrEqual(loop.succeededAfter(attempt: atKill), 30, "copies succeed again after the failover")
        let succeeded = loop.succeeded
        print("SentinelMountTests: \(loop.attempts) copies, \(succeeded.count) succeeded, \(loop.failed.count) failed (\(atKill) before the kill)")
        XCTAssertEqual(try c.masterPort(), first)
        assertListedIndexedReadable(succeeded, m, masterPort: first)
        let names = listed(m)
        let s = try stat(m)
        XCTAssertGreaterThanOrEqual(s.count, Int64(succeeded.count), "casfs stat counts every copied blob")
        XCTAssertEqual(s.count, Int64(names.count), "casfs stat counts what ls lists")
        // A copy that failed left no name the mount cannot read.
        for b in loop.failed where names.contains(b.digest.description) {
            let r = runShell("timeout 120 cmp \(shq(b.path)) \(shq(m.path(b.digest)))")
            XCTAssertTrue(r.ok, "\(b.digest) (its cp failed) is listed but does not read back: \(r)")
        }
        XCTAssertTrue(m.isRunning)
    }
}

/// Outcomes of a loop of copies run on another thread.
private final class CopyLoop: @unchecked Sendable {
    private let lock = NSLock()
    private var outcomes: [(blob: (path: String, digest: Digest), ok: Bool, status: Int32)] = []
    private var stopping = false

    func record(_ blob: (path: String, digest: Digest), _ r: ShellResult) {
        lock.lock(); defer { lock.unlock() }
        outcomes.append((blob, r.ok, r.status))
    }

    func stop() { lock.lock(); stopping = true; lock.unlock() }
    var stopRequested: Bool { lock.lock(); defer { lock.unlock() }; return stopping }
    var attempts: Int { lock.lock(); defer { lock.unlock() }; return outcomes.count }
    var succeeded: [(path: String, digest: Digest)] {
        lock.lock(); defer { lock.unlock() }
        return outcomes.filter(\.ok).map(\.blob)
    }
    var failed: [(path: String, digest: Digest)] {
        lock.lock(); defer { lock.unlock() }
        return outcomes.filter { !$0.ok }.map(\.blob)
    }
    /// Digests of copies stopped by the hang guard.
    var hung: [String] {
        lock.lock(); defer { lock.unlock() }
        return outcomes.filter { $0.status == 124 }.map { $0.blob.digest.description }
    }
    func succeededAfter(attempt: Int) -> Int {
        lock.lock(); defer { lock.unlock() }
        return outcomes.dropFirst(attempt).filter(\.ok).count
    }
}
