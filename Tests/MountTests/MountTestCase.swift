import CASCore
import Foundation
import TestSupport
import XCTest

/// Shared set-up for mount tests: a temp dir, a Redis server, configs, blobs.
class MountTestCase: XCTestCase {
    var tmp = ""
    var mounts: [CasfsMount] = []
    var redis: TestRedis?

    override func setUpWithError() throws {
        try requireFuse()
        _ = try casfsBinary()
        tmp = try makeMountTempDir(String(describing: type(of: self)))
    }

    override func tearDown() {
        for m in mounts { m.unmount() }
        mounts = []
        redis?.stop()
        redis = nil
        if !tmp.isEmpty { try? FileManager.default.removeItem(atPath: tmp) }
    }

    func startRedis() throws -> TestRedis {
        if let redis { return redis }
        let r = try TestRedis.start(dir: tmp + "/redis")
        redis = r
        return r
    }

    var storeDir: String { tmp + "/store" }

    /// WithCache(lru → redis-index → disk).
    func cachedIndexedConfig(writable: Bool = true, cacheSize: String = "64M") throws -> String {
        let r = try startRedis()
        return """
            storage: !with-cache-storage
              cache: !lru-storage
                size: \(cacheSize)
              fallback: !redis-index
                redis: !redis-connection
                  host: 127.0.0.1
                  port: \(r.port)
                storage: !disk-storage
                  path: \(storeDir)
            mount:
              writable: \(writable)

            """
    }

    /// redis-index → disk, nothing held in memory, on a Redis of its own.
    func indexedDiskConfig(writable: Bool = true) throws -> String {
        indexedDiskConfig(port: try startRedis().port, store: storeDir, writable: writable)
    }

    /// redis-index (the Redis on `port`) → disk store at `store`.
    func indexedDiskConfig(port: Int, store: String, writable: Bool = true) -> String {
        """
        storage: !redis-index
          redis: !redis-connection
            host: 127.0.0.1
            port: \(port)
          storage: !disk-storage
            path: \(store)
        mount:
          writable: \(writable)

        """
    }

    /// WithCache(memory → disk), no index.
    func cachedDiskConfig() -> String {
        """
        storage: !with-cache-storage
          cache: !lru-storage
            size: 256M
          fallback: !disk-storage
            path: \(storeDir)
        mount:
          writable: false

        """
    }

    func mount(_ config: String, options: [String] = [], name: String = "m") throws -> CasfsMount {
        let dir = tmp + "/" + name
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let m = try CasfsMount(root: dir, config: config, options: options)
        mounts.append(m)
        return m
    }

    /// Writes `data` to a local file and returns its path and digest.
    func localBlob(_ data: Data, name: String? = nil) throws -> (path: String, digest: Digest) {
        try writeLocalBlob(data, in: tmp + "/src", name: name)
    }

    /// Puts a blob straight into the disk store (BuildGrid layout), bypassing the mount.
    func placeInDiskStore(_ data: Data) throws -> Digest {
        let d = Digest.of(data)
        let p = diskObjectPath(root: storeDir, d)
        try FileManager.default.createDirectory(atPath: (p as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try data.write(to: URL(fileURLWithPath: p))
        return d
    }

    func randomData(_ n: Int, seed: UInt64) -> Data { TestSupport.randomData(n, seed: seed) }

    func sh(_ cmd: String, file: StaticString = #filePath, line: UInt = #line) -> ShellResult {
        runShell(cmd)
    }

    @discardableResult
    func mustSh(_ cmd: String, file: StaticString = #filePath, line: UInt = #line) -> String {
        let r = runShell(cmd)
        XCTAssertTrue(r.ok, "\(cmd): \(r)", file: file, line: line)
        return r.stdout
    }

    func indexed(_ d: Digest) throws -> Bool {
        try startRedis().cli("EXISTS A:\(d)").trimmingCharacters(in: .whitespacesAndNewlines) == "1"
    }
}

