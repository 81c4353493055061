import CASConfig
import CASCore
import CASDaemon
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import TestSupport
import XCTest

/// The daemon's services run in this process, as `casfs mount` runs them:
/// a real FUSE mount over a memory store and a real metrics socket, driven
/// with shell tools, stopped through the service group.
final class ServiceGroupMountTests: XCTestCase {
    var tmp = ""
    let log = Logger(label: "casfs.test")

    override func setUpWithError() throws {
        try requireFuse()
        tmp = try makeMountTempDir("CASDaemonTests")
    }

    override func tearDown() {
        if !tmp.isEmpty {
            _ = runShell("fusermount3 -uz \(shq(tmp + "/mnt")) 2>/dev/null")
            try? FileManager.default.removeItem(atPath: tmp)
        }
    }

    /// A writable memory store, with metrics on a free port of 127.0.0.1.
    func makeDaemon() throws -> MountDaemon {
        let config = tmp + "/cas.yaml"
        try """
            storage: !lru-storage
              size: 64M
            mount:
              writable: true

            """.write(toFile: config, atomically: true, encoding: .utf8)
        try FileManager.default.createDirectory(atPath: tmp + "/mnt", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: tmp + "/staging", withIntermediateDirectories: true)
        let stack = try OpenStack(configPath: config)
        var options = stack.stack.mount
        options.metricsAddress = ListenAddress(host: "127.0.0.1", port: 0)
        return try MountDaemon(stack: stack, options: options, mountpoint: tmp + "/mnt",
                               stagingDirectory: tmp + "/staging", log: log)
    }

    /// Starts the daemon's group on a task; returns once the mount answers.
    func start(_ daemon: MountDaemon) throws -> (ServiceGroup, Task<Void, any Error>) {
        let ready = DispatchSemaphore(value: 0)
        let group = Daemon.group(daemon.services(ready: { ready.signal() }), log: log)
        let task = Task { try await group.run() }
        XCTAssertEqual(ready.wait(timeout: .now() + 30), .success, "the mount did not become ready")
        return (group, task)
    }

    func waitFor(_ task: Task<Void, any Error>, seconds: Double = 60) throws {
        let done = DispatchSemaphore(value: 0)
        let failure = Mutex<(any Error)?>(nil)
        Task {
            do { try await task.value } catch { failure.withLock { $0 = error } }
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + seconds), .success, "the service group did not end")
        if let e = failure.withLock({ $0 }) { throw e }
    }

    /// Writes a blob with cp and reads it back with cat; scrapes the metrics.
    func exercise(_ daemon: MountDaemon) throws -> Int {
        let data = randomData(300_000, seed: 7)
        let (path, digest) = try writeLocalBlob(data, in: tmp)
        let target = "\(tmp)/mnt/sha256/\(digest)"
        XCTAssertTrue(runShell("cp \(shq(path)) \(shq(target))").ok)
        XCTAssertEqual(runShell("cat \(shq(target)) | sha256sum").stdout.prefix(64), Substring(digest.hash))
        let port = try XCTUnwrap(daemon.metrics?.port)
        let scrape = runShell("curl -sf http://127.0.0.1:\(port)/metrics")
        XCTAssertTrue(scrape.ok, "\(scrape)")
        XCTAssertTrue(scrape.stdout.contains("casfs_"), scrape.stdout)
        return port
    }

    func assertStopped(port: Int) {
        XCTAssertFalse(isFuseMounted(tmp + "/mnt"), "the mount is gone")
        XCTAssertFalse(runShell("curl -s --max-time 5 http://127.0.0.1:\(port)/metrics").ok, "the metrics port is closed")
    }

    func testGracefulShutdownUnmountsAndClosesTheMetricsPort() throws {
        let daemon = try makeDaemon()
        let (group, task) = try start(daemon)
        let port = try exercise(daemon)
        XCTAssertTrue(isFuseMounted(tmp + "/mnt"))
        let shutdown = DispatchSemaphore(value: 0)
        Task {
            await group.triggerGracefulShutdown()
            shutdown.signal()
        }
        shutdown.wait()
        try waitFor(task)
        assertStopped(port: port)
    }

    func testSigtermStopsTheGroup() throws {
        let daemon = try makeDaemon()
        let (_, task) = try start(daemon)
        let port = try exercise(daemon)
        XCTAssertEqual(kill(getpid(), SIGTERM), 0)
        try waitFor(task)
        assertStopped(port: port)
    }

    func testUnmountFromOutsideStopsTheGroup() throws {
        let daemon = try makeDaemon()
        let (_, task) = try start(daemon)
        let port = try exercise(daemon)
        XCTAssertTrue(pollUntil(30) { runShell("fusermount3 -u \(shq(self.tmp + "/mnt"))").ok })
        try waitFor(task)
        assertStopped(port: port)
    }

    func testServedMountStartsAndStopsWithoutAGroup() throws {
        let daemon = try makeDaemon()
        let served = try ServedMount.start(daemon.fileSystem, mountpoint: tmp + "/mnt", log: log)
        XCTAssertTrue(served.waitUntilReady(timeout: 30))
        XCTAssertTrue(runShell("ls \(shq(tmp + "/mnt/sha256"))").ok)
        try served.stop()
        XCTAssertFalse(served.isServing)
        XCTAssertFalse(isFuseMounted(tmp + "/mnt"))
        daemon.metrics?.server.stop()
        daemon.stack.close()
    }

    func testAMountThatFailsEndsTheGroupWithItsError() throws {
        let daemon = try MountDaemon(stack: try OpenStack(configPath: {
            let c = tmp + "/plain.yaml"
            try "storage: !lru-storage\n  size: 1M\n".write(toFile: c, atomically: true, encoding: .utf8)
            return c
        }()), options: MountOptions(), mountpoint: tmp + "/no-such-dir", stagingDirectory: tmp, log: log)
        let group = Daemon.group(daemon.services(), log: log)
        let task = Task { try await group.run() }
        XCTAssertThrowsError(try waitFor(task)) { e in
            XCTAssertTrue("\(e)".contains("no-such-dir"), "\(e)")
        }
    }
}
