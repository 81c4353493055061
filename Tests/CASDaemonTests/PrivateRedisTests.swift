import CASConfig
import CASCore
import CASDaemon
import CASProcess
import Logging
import Synchronization
import CASStorage
import Foundation
import TestSupport
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

    // MARK: one server per directory, restarted only when gone

    var dirs: [String] = []

    override func tearDown() {
        for d in dirs {
            let r = PrivateRedis(directory: d)
            r.stop(timeout: 5)
            // A server a test left running (by its pid, found by its socket).
            for pid in servers(r) { kill(pid, SIGKILL) }
            try? FileManager.default.removeItem(atPath: d)
        }
        dirs = []
    }

    func makeDirectory() -> String {
        let d = NSTemporaryDirectory() + "casfs-pr-\(UUID().uuidString.prefix(8))"
        dirs.append(d)
        return d
    }

    /// The pids of redis-server processes listening on `redis`'s socket.
    func servers(_ redis: PrivateRedis) -> [pid_t] {
        runShell("pgrep -f \(shq("redis-server unixsocket:" + redis.socketPath))").stdout
            .split(separator: "\n").compactMap { pid_t($0) }
            .filter { processIsAlive($0) }
    }

    func testOneServerPerDirectory() throws {
        let dir = makeDirectory()
        let a = PrivateRedis(directory: dir)
        let b = PrivateRedis(directory: dir)
        XCTAssertTrue(try a.start())
        XCTAssertFalse(try b.start(), "a second start finds the server there")
        XCTAssertEqual(servers(a).count, 1)
        XCTAssertEqual(b.isHeld(), true)
        XCTAssertFalse(runShell("flock -n \(shq(a.lockFile)) true").ok, "the server holds the directory's lock")
        XCTAssertEqual(b.serverHandle()?.pid, a.serverHandle()?.pid)
        b.stop()
        XCTAssertEqual(servers(a), [])
        XCTAssertEqual(a.isHeld(), false, "the lock goes with the server")
    }

    func testWatchdogRestartsOnlyAServerThatIsGone() throws {
        let redis = PrivateRedis(directory: makeDirectory())
        try redis.start()
        let first = try XCTUnwrap(redis.serverHandle()?.pid)
        let restarts = Mutex(0)
        let dog = PrivateRedisWatchdog.start(redis, interval: 0.1, log: Logger(label: "test")) { restarts.withLock { $0 += 1 } }
        defer { dog.stop() }

        // Stopped: connects time out, the process is there. Left alone.
        XCTAssertEqual(kill(first, SIGSTOP), 0)
        XCTAssertFalse(redis.isRunning())
        usleep(1_500_000)
        XCTAssertEqual(servers(redis), [first])
        XCTAssertEqual(kill(first, SIGCONT), 0)
        // Unreachable: the socket gone, connects fail. Left alone.
        XCTAssertEqual(rename(redis.socketPath, redis.socketPath + ".away"), 0)
        XCTAssertFalse(redis.isRunning())
        usleep(1_500_000)
        XCTAssertEqual(servers(redis), [first])
        XCTAssertEqual(dog.restartCount, 0)
        XCTAssertEqual(rename(redis.socketPath + ".away", redis.socketPath), 0)

        // Gone: exactly one new server.
        XCTAssertEqual(kill(first, SIGKILL), 0)
        XCTAssertTrue(pollUntil(60) { redis.isRunning() && redis.serverHandle()?.pid != first }, "no new server")
        usleep(1_000_000)
        let now = servers(redis)
        XCTAssertEqual(now.count, 1, "\(now)")
        XCTAssertFalse(now.contains(first))
        XCTAssertEqual(dog.restartCount, 1)
        XCTAssertEqual(restarts.withLock { $0 }, 1)
        XCTAssertFalse(processIsAlive(first) || FileManager.default.fileExists(atPath: "/proc/\(first)"),
                       "the killed server was reaped")
        dog.stop()
        redis.stop()
        XCTAssertEqual(servers(redis), [])
    }

    /// The lock, not a connect, decides: while another process holds the
    /// directory, a dead server is not replaced; once it lets go, it is.
    func testNoServerWhileTheDirectoryIsHeld() throws {
        let redis = PrivateRedis(directory: makeDirectory())
        try redis.start()
        let first = try XCTUnwrap(redis.serverHandle()?.pid)
        XCTAssertEqual(kill(first, SIGKILL), 0)
        XCTAssertTrue(pollUntil(30) { redis.isHeld() == false })
        // A leftover of the old server (say, its AOF rewrite child) holds the directory.
        let holder = try Spawn.start("/usr/bin/flock", ["flock", "-x", redis.lockFile, "sleep", "600"], processGroup: true).get()
        var held = true
        func release() {
            guard held else { return }
            held = false
            kill(-holder, SIGKILL)
            _ = Spawn.wait(holder)
        }
        defer { release() }
        XCTAssertTrue(pollUntil(30) { redis.isHeld() == true })
        let dog = PrivateRedisWatchdog.start(redis, interval: 0.1, log: Logger(label: "test")) {}
        defer { dog.stop() }
        usleep(1_500_000)
        XCTAssertEqual(servers(redis), [], "no server started while the directory is held")
        XCTAssertEqual(dog.restartCount, 0)
        release()
        XCTAssertTrue(pollUntil(60) { redis.isRunning() }, "no new server once the lock is free")
        XCTAssertEqual(servers(redis).count, 1)
        XCTAssertEqual(dog.restartCount, 1)
    }

    func testStopReapsAServerThatIsAlreadyAZombie() throws {
        let redis = PrivateRedis(directory: makeDirectory())
        try redis.start()
        let pid = try XCTUnwrap(redis.serverHandle()?.pid)
        XCTAssertEqual(kill(pid, SIGKILL), 0)
        XCTAssertTrue(pollUntil(30) { ((try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? "").contains(") Z ") },
                      "our child is a zombie until reaped")
        redis.stop()
        XCTAssertFalse(FileManager.default.fileExists(atPath: "/proc/\(pid)"), "stop() reaped it")
        XCTAssertEqual(redis.isHeld(), false)
    }

    func testAServerThatDoesNotComeUpIsStopped() throws {
        let dir = makeDirectory()
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let marker = "\(Int.random(in: 100_000...999_999))"
        let fake = dir + "/fake-redis-server"
        try "#!/bin/sh\nexec sleep 9\(marker)\n".write(toFile: fake, atomically: true, encoding: .utf8)
        chmod(fake, 0o755)
        let redis = PrivateRedis(directory: dir, executable: fake)
        XCTAssertThrowsError(try redis.start(timeout: 2)) { e in
            XCTAssertTrue("\(e)".contains("did not answer"), "\(e)")
        }
        XCTAssertTrue(pollUntil(30) { !runShell("pgrep -f 'sleep 9\(marker)'").ok }, "the server that did not come up still runs")
        XCTAssertEqual(redis.isHeld(), false, "and its lock is free")
    }
}
