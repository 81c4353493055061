import CASConfig
import CASCore
@testable import CASDaemon
import CASProcess
import Logging
import Redis
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
    func servers(_ redis: PrivateRedis) -> [pid_t] { Self.servers(redis) }

    static func servers(_ redis: PrivateRedis) -> [pid_t] {
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

    /// A server reading a large append-only file answers `-LOADING` for
    /// longer than the start timeout: it is waited for, never killed, by
    /// the start that launched it, by a second start that finds it there,
    /// and by the watchdog restarting it; the index comes up once loaded.
    /// The load is slowed by redis-server's own `key-load-delay` (a delay
    /// per key read), through a wrapper that passes it on.
    func testAServerLoadingItsDataIsWaitedForNotKilled() throws {
        let data = makeDirectory()
        let redisDirectory = DefaultConfig.redisDirectory(dataDirectory: data)
        let plain = PrivateRedis(directory: redisDirectory)
        // Five blobs in the index, 30000 other keys (database 2) to load.
        try plain.start()
        let blobs = (0..<5).map { Data("loaded blob \($0)".utf8) }
        do {
            let c = try DefaultConfig.make(dataDirectory: data, redis: plain)
            for b in blobs { try c.storage.commitWrite(Digest.of(b), DataSource(b)) }
            try c.storage.stop()
        }
        let keys = 30_000
        let filler = RedisPool(RedisConfig(unixSocket: plain.socketPath, db: 2, commandTimeout: 30, maxConnections: 1))
        for chunk in stride(from: 0, to: keys, by: 1000) {
            let replies = try filler.pipeline((chunk..<min(keys, chunk + 1000)).map {
                [.string("SET"), .string("filler:\($0)"), .string(String(repeating: "v", count: 32))]
            })
            XCTAssertTrue(replies.allSatisfy { $0.string == "OK" })
        }
        filler.close()
        plain.stop()
        XCTAssertEqual(servers(plain), [])

        let wrapper = data + "/slow-loading-redis-server"
        let real = try XCTUnwrap(Spawn.findExecutable("redis-server", extraDirectories: ["/usr/sbin", "/usr/bin"]))
        // 300 µs per key: some 9 s of loading, answering between batches of 1024 keys.
        try "#!/bin/sh\nexec \(shq(real)) \"$@\" --key-load-delay 300\n".write(toFile: wrapper, atomically: true, encoding: .utf8)
        XCTAssertEqual(chmod(wrapper, 0o755), 0)
        let timeout = 1.0

        /// Runs `body` while watching the directory: the servers started
        /// there (the pids their pid files named), and whether a `-LOADING`
        /// answer came after `timeout` had passed.
        func watching(_ redis: PrivateRedis, _ body: () throws -> Void) rethrows -> (pids: Set<pid_t>, loadingAfterTimeout: Bool) {
            let seen = Mutex((pids: Set<pid_t>(), late: false))
            let done = Atomic(false)
            let began = Date()
            let watcher = Thread {
                while !done.load(ordering: .relaxed) {
                    let now = redis.serverPID()
                    let answer = redis.probe()
                    seen.withLock { s in
                        if let now { s.pids.insert(now) }
                        if case .loading = answer, Date().timeIntervalSince(began) > timeout + 0.5 { s.late = true }
                    }
                    usleep(100_000)
                }
                done.store(false, ordering: .relaxed)
            }
            watcher.start()
            defer {
                done.store(true, ordering: .relaxed)
                while done.load(ordering: .relaxed) { usleep(10_000) }
            }
            try body()
            return seen.withLock { ($0.pids, $0.late) }
        }

        // The start that launches it, and a second start that finds it loading.
        let redis = PrivateRedis(directory: redisDirectory, executable: wrapper)
        let other = PrivateRedis(directory: redisDirectory, executable: wrapper)
        let otherStarted = Mutex<Result<Bool, any Error>?>(nil)
        let first = try watching(redis) {
            let second = Thread {
                _ = pollUntil(30) { !Self.servers(redis).isEmpty }
                otherStarted.withLock { $0 = Result { try other.start(timeout: timeout) } }
            }
            second.start()
            XCTAssertTrue(try redis.start(timeout: timeout), "this start launched the server")
            XCTAssertTrue(pollUntil(60) { otherStarted.withLock { $0 != nil } })
        }
        XCTAssertTrue(first.loadingAfterTimeout, "the load did not outlast the start timeout: the test proves nothing")
        XCTAssertEqual(first.pids.count, 1, "the loading server was replaced: \(first.pids)")
        let pid = try XCTUnwrap(redis.serverHandle()?.pid)
        XCTAssertEqual(first.pids, [pid])
        switch otherStarted.withLock({ $0 }) {
        case .success(let launched): XCTAssertFalse(launched, "the second start found the server there")
        case .failure(let e): XCTFail("the second start failed: \(e)")
        case nil: XCTFail("the second start did not end")
        }
        XCTAssertTrue(redis.isRunning())
        XCTAssertEqual(other.serverHandle()?.pid, pid)
        func checkLoaded() throws {
            let c = try DefaultConfig.make(dataDirectory: data, redis: redis)
            XCTAssertEqual(try c.index?.blobCount(), 5)
            XCTAssertEqual(try c.storage.getBlob(Digest.of(blobs[2]))?.readAll(), blobs[2])
            try c.storage.stop()
            let pool = RedisPool(RedisConfig(unixSocket: redis.socketPath, db: 2, maxConnections: 1))
            defer { pool.close() }
            XCTAssertEqual(try pool.command("DBSIZE").integerValue(), Int64(keys))
        }
        try checkLoaded()

        // The watchdog's restart: the new server loads as long, and is left to.
        let restarts = Mutex(0)
        let dog = PrivateRedisWatchdog.start(redis, interval: 0.1, startTimeout: timeout, log: Logger(label: "test")) {
            restarts.withLock { $0 += 1 }
        }
        defer { dog.stop() }
        let second = watching(redis) {
            XCTAssertEqual(kill(pid, SIGKILL), 0)
            XCTAssertTrue(pollUntil(120) { restarts.withLock { $0 } == 1 }, "the watchdog did not bring the server back")
        }
        XCTAssertTrue(second.loadingAfterTimeout, "the load did not outlast the start timeout: the test proves nothing")
        let restarted = try XCTUnwrap(redis.serverHandle()?.pid)
        XCTAssertEqual(second.pids.subtracting([pid]), [restarted], "the loading server was replaced")
        XCTAssertEqual(dog.restartCount, 1)
        XCTAssertTrue(servers(redis).contains(restarted))
        try checkLoaded()
        dog.stop()
        redis.stop()
        XCTAssertEqual(servers(redis), [])
    }

    func testLoadingProgressIsReadFromInfo() {
        let info = "# Persistence\r\nloading:1\r\nloading_loaded_perc:42.50\r\nloading_eta_seconds:17\r\n"
        XCTAssertEqual(PrivateRedis.loadingProgress(info), .loading(percent: 42.5, etaSeconds: 17))
        XCTAssertEqual(PrivateRedis.loadingProgress("loading:1\r\nloading_eta_seconds:-3\r\n"), .loading(percent: nil, etaSeconds: nil))
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
