import CASCore
import Foundation
import TestSupport
import XCTest

/// `defer-fallback-writes: true` in front of a live BuildGrid: writes are
/// acknowledged once the local cache and the journal hold them, whatever the
/// server does, and every acknowledged write reaches the server in the end —
/// across a stalled server, a killed and restarted server, and a daemon
/// killed with SIGKILL.
final class DeferredWriteTests: MountTestCase {
    var server: BuildGridServer!
    let count = 16
    let size: Int64 = 32 << 20

    override func setUpWithError() throws {
        try super.setUpWithError()
        server = try BuildGridServer(directory: tmp + "/bgd")
    }

    override func tearDown() {
        server?.resume()
        super.tearDown()
        server?.stop()
        server = nil
    }

    func deferredConfig() -> String {
        """
        storage: !with-cache-storage
          cache: !disk-storage
            path: \(tmp)/cache
          fallback: !remote-storage
            url: \(server.url)
            request-timeout: 5s
          defer-fallback-writes: true
        mount:
          writable: true

        """
    }

    /// `count` files of random bytes.
    func files(_ tag: String) throws -> [(path: String, digest: Digest)] {
        try (0..<count).map { i in
            let p = "\(tmp)/src/\(tag)-\(i)"
            return (p, try randomFile(p, size: size))
        }
    }

    /// The deferred-write line of `casfs stat --mount`: (queued, oldest age in seconds).
    func queue(_ m: CasfsMount) throws -> (queued: Int, oldest: Double) {
        let r = runShell("\(shq(try casfsBinary())) stat --mount \(shq(m.mountpoint))")
        guard r.ok else { throw TestSupportError("casfs stat --mount: \(r)") }
        guard let line = r.stdout.split(separator: "\n").first(where: { $0.hasPrefix("deferred:") }) else {
            throw TestSupportError("casfs stat --mount shows no deferred writes line:\n\(r.stdout)")
        }
        // "deferred:    16 writes queued, oldest 12 s"
        let words = line.split(separator: " ")
        guard let q = words.firstIndex(of: "writes").flatMap({ Int(words[$0 - 1]) }),
              let a = words.firstIndex(of: "oldest").flatMap({ Double(words[$0 + 1]) }) else {
            throw TestSupportError("cannot read \(line)")
        }
        return (q, a)
    }

    func missingOnServer(_ digests: [Digest]) throws -> [String] {
        let out = try server.client(["missing"] + digests.map(\.description))
        guard out.status == 0 else { throw TestSupportError("FindMissingBlobs failed: \(out.stderr)") }
        return out.stdout.split(separator: "\n").map(String.init)
    }

    /// Waits (generously) until BuildGrid has every digest; then compares
    /// each blob BuildGrid serves with the local file.
    func assertArrived(_ written: [(path: String, digest: Digest)], file: StaticString = #filePath, line: UInt = #line) throws {
        var missing: [String] = []
        let arrived = pollUntil(600) {
            missing = (try? missingOnServer(written.map(\.digest))) ?? ["(BuildGrid not answering)"]
            return missing.isEmpty
        }
        XCTAssertTrue(arrived, "never reached BuildGrid: \(missing)", file: file, line: line)
        for w in written {
            let out = "\(tmp)/bg-\(w.digest.hash.prefix(12))"
            let r = try server.client(["read", w.digest.description, out])
            XCTAssertEqual(r.status, 0, r.stderr, file: file, line: line)
            XCTAssertEqual(try sha256OfFile(out), w.digest.hash, "BuildGrid holds other bytes for \(w.digest)", file: file, line: line)
            unlink(out)
        }
    }

    /// Copies each file in; every cp must complete (`timeout` guards only against a hang).
    func copyIn(_ written: [(path: String, digest: Digest)], _ m: CasfsMount, file: StaticString = #filePath, line: UInt = #line) {
        for w in written {
            let r = runShell("timeout 600 cp \(shq(w.path)) \(shq(m.path(w.digest)))")
            XCTAssertNotEqual(r.status, 124, "cp hung while BuildGrid is stalled", file: file, line: line)
            XCTAssertTrue(r.ok, "cp while BuildGrid is stalled: \(r)", file: file, line: line)
        }
    }

    func testWritesWhileTheServerIsStalledThenKilledArriveWithoutARemount() throws {
        let written = try files("a")
        let m = try mount(deferredConfig())
        server.pause()
        copyIn(written, m)
        // Every write is readable through the mount at once.
        for w in written.prefix(2) {
            XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(w.digest))) | cut -c1-64"), w.digest.hash + "\n")
        }
        // The queue shows them, and its oldest entry ages.
        let first = try queue(m)
        XCTAssertEqual(first.queued, count, "queued writes while BuildGrid is stalled")
        sleep(2)
        let second = try queue(m)
        XCTAssertEqual(second.queued, count)
        XCTAssertGreaterThan(second.oldest, first.oldest, "the oldest queued write does not age")

        server.kill9()
        sleep(10)
        try server.start()
        try assertArrived(written)
        XCTAssertTrue(pollUntil(120) { (try? queue(m).queued) == 0 }, "the queue does not drain: \((try? queue(m)).map { "\($0)" } ?? "?")")
        XCTAssertEqual(try queue(m).oldest, 0)
        XCTAssertTrue(m.isRunning)
    }

    func testWritesWhileTheServerIsStalledSurviveADaemonKilledWithSIGKILL() throws {
        let written = try files("b")
        let m = try mount(deferredConfig())
        server.pause()
        copyIn(written, m)
        m.kill9()
        server.resume()
        m.unmount()
        XCTAssertEqual(try missingOnServer(written.map(\.digest)).count, count,
                       "blobs reached BuildGrid before the daemon died (the test did not stall it)")
        try m.mount()
        try assertArrived(written)
        XCTAssertTrue(pollUntil(120) { (try? queue(m).queued) == 0 }, "the replayed queue does not drain")
    }
}
