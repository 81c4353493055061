import CASCore
import Foundation
import TestSupport
import XCTest

/// A remote CAS that never answers large ByteStream reads (a stalling server,
/// Tests/python/stalling_cas.py): reads through the mount still get every
/// byte, in requests as large as the kernel asks for, never falling back to
/// 4 KiB reads.
final class RemoteStallTests: XCTestCase {
    var tmp = ""
    var server: Process?
    var mounts: [CasfsMount] = []

    override func setUpWithError() throws {
        try requireFuse()
        _ = try casfsBinary()
        tmp = try makeMountTempDir("RemoteStallTests")
    }

    override func tearDown() {
        for m in mounts { m.unmount() }
        if let s = server, s.isRunning { s.terminate(); s.waitUntilExit() }
        if !tmp.isEmpty { try? FileManager.default.removeItem(atPath: tmp) }
    }

    /// Starts the stalling server over `blobs`; returns its port.
    func startServer(_ blobs: [Data], stallAbove: Int) throws -> Int {
        let dir = tmp + "/blobs"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for b in blobs { try b.write(to: URL(fileURLWithPath: dir + "/\(Digest.of(b))")) }
        let venv = try BuildGridVenv.get()
        let portFile = tmp + "/port"
        let p = try startLoggedProcess(venv.python, [BuildGridVenv.packageRoot + "/Tests/python/stalling_cas.py",
                                                     "--dir", dir, "--port-file", portFile,
                                                     "--stall-above", String(stallAbove)], log: tmp + "/server.log")
        server = p
        XCTAssertTrue(pollUntil(60) { FileManager.default.fileExists(atPath: portFile) || !p.isRunning },
                      (try? String(contentsOfFile: tmp + "/server.log", encoding: .utf8)) ?? "")
        return try XCTUnwrap(Int((try? String(contentsOfFile: portFile, encoding: .utf8)) ?? ""), "no port")
    }

    var readsLog: String { (try? String(contentsOfFile: tmp + "/reads.log", encoding: .utf8)) ?? "" }

    func testAServerThatStallsLargeRangesStillServesWholeReads() throws {
        let data = TestSupport.randomData(8 << 20, seed: 77)
        let d = Digest.of(data)
        let port = try startServer([data], stallAbove: 64 << 10)
        let dir = tmp + "/m"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let m = try CasfsMount(root: dir, config: """
            storage: !with-cache-storage
              cache: !lru-storage
                size: 64M
              fallback: !remote-storage
                url: grpc://127.0.0.1:\(port)
                request-timeout: 1s
            mount:
              writable: false

            """)
        mounts.append(m)
        let got = runShell("sha256sum < \(shq(m.path(d))) | cut -c1-64")
        XCTAssertTrue(got.ok, "\(got)\n\(m.log.suffix(3000))")
        XCTAssertEqual(got.stdout, d.hash + "\n")
        // The server stalled the large ranges; the mount read smaller ones.
        XCTAssertTrue(readsLog.contains("stalled"), readsLog)
        XCTAssertTrue(readsLog.contains("served"), readsLog)
        XCTAssertTrue(m.log.contains("got no answer"), m.log.suffix(3000).description)
        // The kernel read in large requests: no fallback to single pages.
        let stats = try m.stats()
        let reads = stats["casfs_fuse_requests_total{op=\"read\"}"] ?? 0
        let bytes = stats["casfs_read_bytes_total"] ?? 0
        XCTAssertEqual(bytes, Int64(data.count))
        XCTAssertGreaterThan(reads, 0)
        XCTAssertGreaterThanOrEqual(bytes / max(1, reads), 64 << 10, "\(reads) READs for \(bytes) bytes")
        XCTAssertTrue(m.isRunning)
    }
}
