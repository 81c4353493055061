import CASCore
import Foundation
import RemoteCAS
import TestSupport
import XCTest

/// Remote CAS servers that answer slowly or not at all
/// (Tests/python/stalling_cas.py, on BuildGrid's gRPC stubs): a server that
/// never answers large ByteStream reads still serves whole reads through a
/// mount, in requests as large as the kernel asks for; a server that never
/// answers any read fails a read after two stall timeouts and a bounded
/// number of calls; a server with a large batch limit still gets single
/// large blobs over ByteStream.
final class RemoteStallTests: XCTestCase {
    var tmp = ""
    var server: Process?
    var mounts: [CasfsMount] = []

    override func setUpWithError() throws {
        tmp = try makeMountTempDir("RemoteStallTests")
    }

    override func tearDown() {
        for m in mounts { m.unmount() }
        if let s = server, s.isRunning { s.terminate(); s.waitUntilExit() }
        if !tmp.isEmpty { try? FileManager.default.removeItem(atPath: tmp) }
    }

    /// Starts the stalling server over `blobs` with `options`; returns its port.
    func startServer(_ blobs: [Data], _ options: [String]) throws -> Int {
        let dir = tmp + "/blobs"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for b in blobs { try b.write(to: URL(fileURLWithPath: dir + "/\(Digest.of(b))")) }
        let venv = try BuildGridVenv.get()
        let portFile = tmp + "/port"
        let p = try startLoggedProcess(venv.python, [BuildGridVenv.packageRoot + "/Tests/python/stalling_cas.py",
                                                     "--dir", dir, "--port-file", portFile] + options,
                                       log: tmp + "/server.log")
        server = p
        XCTAssertTrue(pollUntil(60) { FileManager.default.fileExists(atPath: portFile) || !p.isRunning },
                      (try? String(contentsOfFile: tmp + "/server.log", encoding: .utf8)) ?? "")
        return try XCTUnwrap(Int((try? String(contentsOfFile: portFile, encoding: .utf8)) ?? ""), "no port")
    }

    func mount(port: Int, timeout: String) throws -> CasfsMount {
        try requireFuse()
        _ = try casfsBinary()
        let dir = tmp + "/m"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let m = try CasfsMount(root: dir, config: """
            storage: !with-cache-storage
              cache: !lru-storage
                size: 64M
              fallback: !remote-storage
                url: grpc://127.0.0.1:\(port)
                request-timeout: \(timeout)
            mount:
              writable: false

            """)
        mounts.append(m)
        return m
    }

    var readsLog: String { (try? String(contentsOfFile: tmp + "/reads.log", encoding: .utf8)) ?? "" }

    /// The server's calls so far, one per line ("Read <blob> <offset> <limit> served", ...).
    var calls: [String] {
        ((try? String(contentsOfFile: tmp + "/calls.log", encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }

    func testAServerThatStallsLargeRangesStillServesWholeReads() throws {
        let data = TestSupport.randomData(8 << 20, seed: 77)
        let d = Digest.of(data)
        let port = try startServer([data], ["--stall-above", String(64 << 10)])
        let m = try mount(port: port, timeout: "1s")
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

    /// A server that accepts calls and never answers a read: each read is
    /// one attempt at the whole range and one at a small range, then an
    /// `unavailable` error; the range size does not shrink for later reads.
    /// (Each attempt has a deadline of the stall timeout plus the range at
    /// 8 MiB/s, so the call count bounds the time; the time is printed.)
    func testAServerThatNeverAnswersFailsReadsAfterTwoCalls() throws {
        let data = TestSupport.randomData((1 << 20) + 17, seed: 78)
        let d = Digest.of(data)
        let port = try startServer([data], ["--hang-reads"])
        let remote = try RemoteStorage(url: "grpc://127.0.0.1:\(port)", requestTimeout: 1, retries: 2)
        for round in 1...2 {
            let before = calls.filter { $0.hasPrefix("Read ") }.count
            let start = Date()
            XCTAssertThrowsError(try remote.read(d, offset: 0, length: 1 << 20)) { e in
                guard case .unavailable = e as? StorageError else { return XCTFail("\(e)") }
            }
            print("read \(round) against a hung server failed after \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
            let reads = Array(calls.filter { $0.hasPrefix("Read ") }.dropFirst(before))
            XCTAssertEqual(reads, ["Read \(d) 0 \(1 << 20) stalled", "Read \(d) 0 \(16 << 10) stalled"], "round \(round)")
        }
        // A whole-blob download: its ranges, each with one small range after it.
        let before = calls.filter { $0.hasPrefix("Read ") }.count
        let big = Digest.of(TestSupport.randomData(9 << 20, seed: 79))
        try TestSupport.randomData(9 << 20, seed: 79).write(to: URL(fileURLWithPath: tmp + "/blobs/\(big)"))
        XCTAssertThrowsError(try remote.getBlob(big)) { e in
            guard case .unavailable = e as? StorageError else { return XCTFail("\(e)") }
        }
        let reads = calls.filter { $0.hasPrefix("Read ") }.dropFirst(before)
        XCTAssertGreaterThan(reads.count, 0)
        XCTAssertLessThanOrEqual(reads.count, 6, "3 ranges of 4 MiB and at most one small range each: \(reads)")
        let limits = Set(reads.map { String($0.split(separator: " ")[3]) })
        XCTAssertTrue(limits.isSubset(of: ["\(4 << 20)", "\(1 << 20)", "\(16 << 10)"]), "\(reads)")
    }

    /// Through a mount: a hung server makes `cat` fail with an I/O error in a
    /// bounded number of calls, and the mount stays up.
    func testAHungServerIsAnIOErrorThroughTheMount() throws {
        let data = TestSupport.randomData(6 << 20, seed: 80)
        let d = Digest.of(data)
        let port = try startServer([data], ["--hang-reads"])
        let m = try mount(port: port, timeout: "1s")
        let start = Date()
        let r = runShell("cat \(shq(m.path(d))) > /dev/null")
        let reads = calls.filter { $0.hasPrefix("Read ") }
        print("cat against a hung server failed after \(String(format: "%.1f", Date().timeIntervalSince(start))) s and \(reads.count) reads")
        XCTAssertFalse(r.ok, "\(r)")
        XCTAssertTrue(r.stderr.contains("Input/output error"), "\(r)")
        XCTAssertGreaterThan(reads.count, 0)
        // Two ranges of the blob and one small range after each, per fetch;
        // a fetch for open and one per READ the kernel sends before giving up.
        XCTAssertLessThanOrEqual(reads.count, 40, "\(reads)")
        XCTAssertFalse(reads.contains { $0.contains(" \(4 << 10) ") }, "no 4 KiB ranges: \(reads)")
        XCTAssertTrue(m.isRunning)
    }

    /// A server whose batch limit is 64 MiB: batches of many blobs use it,
    /// but one blob over 4 MiB goes over ByteStream, both ways (never held
    /// in memory whole).
    func testASingleLargeBlobGoesOverByteStreamWhateverTheBatchLimit() throws {
        let big = TestSupport.randomData(5 << 20, seed: 81)
        let smalls = (0..<6).map { TestSupport.randomData(1 << 20, seed: 90 + UInt64($0)) }
        let port = try startServer([big] + smalls, ["--stall-above", String(1 << 40), "--max-batch", String(64 << 20)])
        let remote = try RemoteStorage(url: "grpc://127.0.0.1:\(port)", requestTimeout: 20, retries: 1)
        let db = Digest.of(big)

        let src = try XCTUnwrap(try remote.getBlob(db))
        XCTAssertTrue(src is FileSource, "a blob over 4 MiB is spooled to a file")
        XCTAssertEqual(try src.readAll(), big)
        XCTAssertTrue(calls.contains { $0.hasPrefix("Read \(db) ") }, "\(calls)")
        XCTAssertFalse(calls.contains { $0.hasPrefix("BatchReadBlobs") && $0.contains(db.description) }, "\(calls)")

        let up = TestSupport.randomData(5 << 20, seed: 82)
        let du = Digest.of(up)
        try remote.commitWrite(du, DataSource(up))
        XCTAssertTrue(calls.contains("Write \(du)"), "\(calls)")
        XCTAssertFalse(calls.contains { $0.hasPrefix("BatchUpdateBlobs") }, "\(calls)")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: tmp + "/blobs/\(du)")), up)

        // Many blobs at once: one batch of 6 MiB, over the 4 MiB default.
        let ds = smalls.map { Digest.of($0) }
        let back = try remote.bulkReadBlobs(ds)
        for (d, b) in zip(ds, smalls) { XCTAssertEqual(back[d], b) }
        let batches = calls.filter { $0.hasPrefix("BatchReadBlobs") }
        XCTAssertEqual(batches.count, 1, "\(batches)")
        XCTAssertEqual(Set(batches.first?.split(separator: " ").dropFirst().map(String.init) ?? []), Set(ds.map(\.description)))

        // A small blob alone still goes in a batch.
        let small = TestSupport.randomData(1000, seed: 83)
        try remote.commitWrite(Digest.of(small), DataSource(small))
        XCTAssertTrue(calls.contains("BatchUpdateBlobs \(Digest.of(small))"), "\(calls)")
    }
}
