import CASCore
import Foundation
import RemoteCAS
import TestSupport
import XCTest

/// Shared set-up: a temp dir, a live BuildGrid server, mounts, blobs.
class RemoteTestCase: XCTestCase {
    var tmp = ""
    var server: BuildGridServer!
    var mounts: [CasfsMount] = []

    override func setUpWithError() throws {
        tmp = try makeMountTempDir(String(describing: type(of: self)))
        server = try BuildGridServer(directory: tmp + "/bgd")
    }

    override func tearDown() {
        for m in mounts { m.unmount() }
        mounts = []
        server?.stop()
        server = nil
        if !tmp.isEmpty { try? FileManager.default.removeItem(atPath: tmp) }
    }

    func randomData(_ n: Int, seed: UInt64) -> Data { TestSupport.randomData(n, seed: seed) }

    /// Writes `data` to a local file; returns its path and digest.
    func localFile(_ data: Data, name: String? = nil) throws -> (path: String, digest: Digest) {
        try writeLocalBlob(data, in: tmp + "/src", name: name)
    }

    /// Uploads files with BuildGrid's own stubs (BatchUpdateBlobs or ByteStream Write).
    func uploadWithBuildGridClient(_ paths: [String], instance: String = "") throws {
        let out = try server.client(["upload"] + paths, instance: instance)
        guard out.status == 0 else { throw TestSupportError("upload failed: \(out.stderr)") }
    }

    func missingPerBuildGrid(_ digests: [Digest], instance: String = "") throws -> [String] {
        let out = try server.client(["missing"] + digests.map(\.description), instance: instance)
        guard out.status == 0 else { throw TestSupportError("FindMissingBlobs failed: \(out.stderr)") }
        return out.stdout.split(separator: "\n").map(String.init)
    }

    /// ByteStream-reads `d` with BuildGrid's stubs into a file; returns its bytes.
    func readPerBuildGrid(_ d: Digest, instance: String = "") throws -> Data {
        let path = tmp + "/bg-read-\(UUID().uuidString)"
        let out = try server.client(["read", d.description, path], instance: instance)
        guard out.status == 0 else { throw TestSupportError("ByteStream Read failed: \(out.stderr)") }
        return try Data(contentsOf: URL(fileURLWithPath: path))
    }

    func remoteConfig(cache: String = "!lru-storage\n    size: 64M", writable: Bool = false,
                      instance: String? = nil, timeout: String = "10s", retries: Int = 2) -> String {
        """
        storage: !with-cache-storage
          cache: \(cache)
          fallback: !remote-storage
            url: \(server.url)
            request-timeout: \(timeout)
            retries: \(retries)
        \(instance.map { "    instance-name: \($0)" } ?? "")
        mount:
          writable: \(writable)

        """
    }

    func mount(_ config: String, name: String = "m") throws -> CasfsMount {
        let dir = tmp + "/" + name
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let m = try CasfsMount(root: dir, config: config)
        mounts.append(m)
        return m
    }

    @discardableResult
    func mustSh(_ cmd: String, file: StaticString = #filePath, line: UInt = #line) -> String {
        let r = runShell(cmd)
        XCTAssertTrue(r.ok, "\(cmd): \(r)", file: file, line: line)
        return r.stdout
    }
}

/// RemoteStorage's own calls against BuildGrid, checked with BuildGrid's stubs.
final class RemoteStorageTests: RemoteTestCase {
    func testSmallAndLargeBlobsBothWays() throws {
        let remote = try RemoteStorage(url: server.url, requestTimeout: 20, retries: 2)
        let small = randomData(1000, seed: 1)
        let large = randomData(9 << 20 + 17, seed: 2)  // over the batch limit: ByteStream
        let ds = Digest.of(small), dl = Digest.of(large)
        XCTAssertEqual(Set(try remote.missingBlobs([ds, dl])), [ds, dl])
        XCTAssertNil(try remote.getBlob(ds))
        XCTAssertNil(try remote.getBlob(dl))
        XCTAssertNil(try remote.read(dl, offset: 5, length: 10))

        try remote.commitWrite(ds, DataSource(small))
        try remote.commitWrite(dl, DataSource(large))
        XCTAssertEqual(try missingPerBuildGrid([ds, dl]), [])
        XCTAssertEqual(try readPerBuildGrid(dl), large)
        XCTAssertEqual(try readPerBuildGrid(ds), small)

        XCTAssertTrue(try remote.hasBlob(dl))
        XCTAssertEqual(try remote.getBlob(ds)?.readAll(), small)
        let src = try XCTUnwrap(try remote.getBlob(dl))
        XCTAssertTrue(src is FileSource, "a large blob is spooled to a file")
        XCTAssertEqual(try src.readAll(), large)
        // Ranged reads: ByteStream read_offset/read_limit.
        for (off, len) in [(0, 1), (1 << 20, 4096), (Int(dl.size) - 10, 100), (3_333_333, 2 << 20)] {
            let want = large.subdata(in: off..<min(off + len, large.count))
            XCTAssertEqual(try remote.read(dl, offset: Int64(off), length: len), want, "range \(off)+\(len)")
        }
        XCTAssertEqual(try remote.read(dl, offset: dl.size, length: 10), Data())
        // A CAS cannot delete: a no-op, not an error.
        try remote.deleteBlob(ds)
        XCTAssertEqual(remote.bulkDelete([ds]), [])
        XCTAssertTrue(try remote.hasBlob(ds))
    }

    func testBulkCallsSplitUnderTheBatchLimit() throws {
        let remote = try RemoteStorage(url: server.url, requestTimeout: 20, retries: 2)
        // 12 × 1 MiB cannot go in one 4 MiB request; one 5 MiB blob goes over ByteStream.
        var blobs = (0..<12).map { i -> (Digest, Data) in
            let d = randomData(1 << 20, seed: 100 + UInt64(i))
            return (Digest.of(d), d)
        }
        let big = randomData(5 << 20, seed: 99)
        blobs.append((Digest.of(big), big))
        let statuses = remote.bulkUpdateBlobs(blobs)
        XCTAssertEqual(statuses.compactMap { $0 }.count, 0, "\(statuses)")
        XCTAssertEqual(try missingPerBuildGrid(blobs.map(\.0)), [])
        let back = try remote.bulkReadBlobs(blobs.map(\.0) + [Digest.of(Data("absent".utf8))])
        XCTAssertEqual(back.count, blobs.count)
        for (d, data) in blobs { XCTAssertEqual(back[d], data, "\(d)") }
    }

    func testNamedInstance() throws {
        let remote = try RemoteStorage(url: "http://127.0.0.1:\(server.port)", instanceName: "main",
                                       requestTimeout: 20, retries: 2)
        let data = randomData(6 << 20, seed: 7)
        let d = Digest.of(data)
        try remote.commitWrite(d, DataSource(data))
        XCTAssertEqual(try readPerBuildGrid(d, instance: "main"), data)
        let f = try localFile(randomData(5000, seed: 8))
        try uploadWithBuildGridClient([f.path], instance: "main")
        XCTAssertEqual(try remote.getBlob(f.digest)?.readAll(), try Data(contentsOf: URL(fileURLWithPath: f.path)))
        // An instance BuildGrid does not serve is an error, not "absent".
        let other = try RemoteStorage(url: server.url, instanceName: "nope", requestTimeout: 20, retries: 0)
        XCTAssertThrowsError(try other.hasBlob(d))
    }

    func testServerGoneIsAnErrorAndComesBack() throws {
        let remote = try RemoteStorage(url: server.url, requestTimeout: 5, retries: 2)
        let data = randomData(3000, seed: 9)
        let d = Digest.of(data)
        try remote.commitWrite(d, DataSource(data))
        server.stop()
        XCTAssertThrowsError(try remote.getBlob(d)) { e in
            XCTAssertEqual((e as? StorageError)?.errno, EIO, "\(e)")
        }
        XCTAssertThrowsError(try remote.read(d, offset: 0, length: 10))
        XCTAssertThrowsError(try remote.missingBlobs([d]))
        try server.start()
        XCTAssertEqual(try remote.getBlob(d)?.readAll(), data)
    }

    func testUnresponsiveServerHitsTheDeadline() throws {
        let remote = try RemoteStorage(url: server.url, requestTimeout: 3, retries: 1)
        let data = randomData(3000, seed: 13)
        let d = Digest.of(data)
        try remote.commitWrite(d, DataSource(data))
        server.pause()
        defer { server.resume() }
        XCTAssertThrowsError(try remote.getBlob(d)) { e in
            guard case .unavailable = e as? StorageError else { return XCTFail("\(e)") }
        }
        server.resume()
        XCTAssertEqual(try remote.getBlob(d)?.readAll(), data)
    }

    func testURLForms() throws {
        XCTAssertEqual(try RemoteStorage.Endpoint(url: "http://h:8980"), .init(host: "h", port: 8980, secure: false))
        XCTAssertEqual(try RemoteStorage.Endpoint(url: "grpcs://h"), .init(host: "h", port: 443, secure: true))
        XCTAssertEqual(try RemoteStorage.Endpoint(url: "https://h:1/"), .init(host: "h", port: 1, secure: true))
        XCTAssertEqual(try RemoteStorage.Endpoint(url: "grpc://[::1]:5"), .init(host: "::1", port: 5, secure: false))
        XCTAssertThrowsError(try RemoteStorage.Endpoint(url: "ftp://h:1"))
        XCTAssertThrowsError(try RemoteStorage.Endpoint(url: "grpc://h:99999"))
    }
}
