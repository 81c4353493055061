import Foundation
import TestSupport
import XCTest

/// The worker across events: BuildGrid restarting under it, SIGTERM with an
/// action running (finished within the grace period, or handed back and run
/// by the next worker). One BuildGrid for the class; each test starts its
/// own worker.
final class WorkerLifecycleTests: XCTestCase {
    nonisolated(unsafe) static var shared: (dir: String, grid: BuildGridExecution)?
    nonisolated(unsafe) static var setUpError: Error?

    override class func setUp() {
        super.setUp()
        do {
            try requireFuse()
            let dir = try makeMountTempDir("casfs-worker-life")
            shared = (dir, try BuildGridExecution(directory: dir + "/bgd"))
        } catch {
            setUpError = error
        }
    }

    override class func tearDown() {
        if let s = shared {
            s.grid.stop()
            s.grid.postgres.stop()
            try? FileManager.default.removeItem(atPath: s.dir)
        }
        shared = nil
        super.tearDown()
    }

    var grid: BuildGridExecution { Self.shared!.grid }

    override func setUpWithError() throws {
        if let e = Self.setUpError { throw e }
    }

    func newWorker(_ name: String, extra: [String] = []) throws -> WorkerProcess {
        let dir = Self.shared!.dir + "/" + name
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return try WorkerProcess(server: grid.url, instance: grid.instance, directory: dir, jobs: 1, extra: extra)
    }

    /// Runs `spec` on a thread of its own; the result arrives later.
    func executeInBackground(_ spec: [String: Any]) -> ResultBox {
        let box = ResultBox()
        let grid = self.grid
        let data = try? JSONSerialization.data(withJSONObject: spec)
        Thread {
            box.set(Result {
                let s = try JSONSerialization.jsonObject(with: data ?? Data()) as? [String: Any] ?? [:]
                return try grid.execute(s)
            })
        }.start()
        return box
    }

    func testBuildGridRestartNeedsNoWorkerRestart() throws {
        let worker = try newWorker("restart")
        defer { worker.stop() }
        let first = try grid.execute(["files": ["f": "1"], "arguments": ["/bin/echo", "before"], "salt": UUID().uuidString])
        XCTAssertEqual(first.stdout, "before\n")
        grid.stop()
        // The worker keeps calling and backing off while BuildGrid is away.
        XCTAssertTrue(pollUntil(30) { worker.log().contains("call to the Bots service failed") }, worker.log())
        try grid.start()
        let second = try grid.execute(["files": ["f": "2"], "arguments": ["/bin/echo", "after"], "salt": UUID().uuidString])
        XCTAssertEqual(second.status.code, 0, second.status.message)
        XCTAssertEqual(second.stdout, "after\n")
        XCTAssertTrue(worker.isRunning)
    }

    func testSIGTERMLetsTheRunningActionFinish() throws {
        let worker = try newWorker("drain")
        let pending = executeInBackground(["files": ["f": "x"], "arguments": ["/bin/sh", "-c", "sleep 3; echo finished"],
                                           "salt": UUID().uuidString])
        XCTAssertTrue(pollUntil(60) { worker.log().contains("accepted") }, worker.log())
        worker.signal(SIGTERM)
        let r = try pending.wait().get()
        XCTAssertEqual(r.status.code, 0, r.status.message)
        XCTAssertEqual(r.stdout, "finished\n")
        XCTAssertEqual(worker.stop(seconds: 30), 0, worker.log())
        XCTAssertTrue(worker.log().contains("stopped: every lease reported"), worker.log())
    }

    func testSIGTERMHandsBackWhatCannotFinish() throws {
        let first = try newWorker("handback", extra: ["--shutdown-grace", "0"])
        let marker = UUID().uuidString
        let pending = executeInBackground(["files": ["f": "x"],
                                           "arguments": ["/bin/sh", "-c", "echo \(marker) > /dev/null; sleep 4; echo done-once"],
                                           "salt": marker])
        XCTAssertTrue(pollUntil(60) { first.log().contains("accepted") }, first.log())
        first.signal(SIGTERM)
        XCTAssertEqual(first.stop(seconds: 30), 0, first.log())
        XCTAssertTrue(first.log().contains("handed_back"), first.log())
        // BuildGrid requeues the lease; the next worker runs it to the end.
        let second = try newWorker("handback-2")
        defer { second.stop() }
        let r = try pending.wait().get()
        XCTAssertEqual(r.status.code, 0, r.status.message)
        XCTAssertEqual(r.stdout, "done-once\n")
        XCTAssertTrue(second.log().contains("accepted"), second.log())
    }
}

final class ResultBox: @unchecked Sendable {
    private let lock = NSCondition()
    private var value: Result<[String: Any], Error>?

    func set(_ v: Result<[String: Any], Error>) {
        lock.lock()
        value = v
        lock.broadcast()
        lock.unlock()
    }

    func wait() -> Result<[String: Any], Error> {
        lock.lock()
        defer { lock.unlock() }
        while value == nil { lock.wait() }
        return value!
    }
}
