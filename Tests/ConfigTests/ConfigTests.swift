import CASConfig
import CASCore
import CASStorage
import Foundation
import XCTest

final class ConfigTests: XCTestCase {
    var dir = ""

    override func setUp() {
        dir = NSTemporaryDirectory() + "casfs-config-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func testBuildGridStyleConfigWithAnchors() throws {
        let yaml = """
        connections:
          - !redis-connection &redis
            host: 127.0.0.1
            port: 6390
            db: 2
        storages:
          - !disk-storage &disk
            path: \(dir)/store
        storage: !with-cache-storage
          cache: !lru-storage
            size: 512M
          fallback: !redis-index
            redis: *redis
            storage: *disk
          defer-fallback-writes: yes
          fallback-writer-threads: 4
          journal: \(dir)/journal
        mount:
          writable: true
          negative-timeout: 2s
          entry-timeout: 1h
          tree-cache-size: 8M
        """
        let c = try CasfsConfig.parse(yaml: yaml)
        let wc = try XCTUnwrap(c.nodes["storage"] as? WithCacheStorage)
        XCTAssertTrue(wc.deferFallbackWrites)
        XCTAssertEqual(wc.journal?.threads, 4)
        XCTAssertEqual(wc.journal?.directory, "\(dir)/journal")
        XCTAssertEqual((wc.cache as? MemoryStorage)?.maxBytes, 512 << 20)
        XCTAssertTrue(wc.fallback is VerifyingStorage, "bytes from the index's store are checked")
        let index = try XCTUnwrap(c.nodes["storage.fallback"] as? RedisIndex)
        XCTAssertEqual(index.prefix, "A")
        XCTAssertEqual(index.redis.config.port, 6390)
        XCTAssertEqual(index.redis.config.db, 2)
        XCTAssertEqual((index.storage as? DiskStorage)?.root, "\(dir)/store")
        XCTAssertTrue(c.index === index, "the index is found inside the stack")
        XCTAssertTrue(c.storage is WriteCheckingStorage, "writes enter through the checking decorator")
        XCTAssertTrue(c.mount.writable)
        XCTAssertEqual(c.mount.negativeTimeout, 2)
        XCTAssertEqual(c.mount.entryTimeout, 3600)
        XCTAssertEqual(c.mount.treeCacheBytes, 8 << 20)
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(dir)/store/cas/objects"))
    }

    func testAliasedStorageIsOneInstance() throws {
        let yaml = """
        storages:
          - !lru-storage &mem
            size: 1K
        storage: !with-cache-storage
          cache: *mem
          fallback: *mem
        """
        let wc = try XCTUnwrap(CasfsConfig.parse(yaml: yaml).nodes["storage"] as? WithCacheStorage)
        XCTAssertTrue(wc.cache as AnyObject === wc.fallback as AnyObject)
    }

    func testUnixSocketAndPrefix() throws {
        let yaml = """
        storage: !redis-index
          prefix: casfs
          redis: !redis-connection
            unix-socket: /run/redis.sock
            password: secret
          storage: !lru-storage
            size: 1M
        """
        let c = try CasfsConfig.parse(yaml: yaml)
        let index = try XCTUnwrap(c.nodes["storage"] as? RedisIndex)
        XCTAssertEqual(index.prefix, "casfs")
        XCTAssertEqual(index.totalSizeKey, "casfs:total_size")
        XCTAssertEqual(index.redis.config.unixSocket, "/run/redis.sock")
        XCTAssertEqual(index.redis.config.password, "secret")
        XCTAssertFalse(c.mount.writable, "read-only by default")
    }

    func testLoadFromFile() throws {
        let path = dir + "/casfs.yaml"
        try "storage: !disk-storage\n  path: \(dir)/d\n".write(toFile: path, atomically: true, encoding: .utf8)
        XCTAssertTrue(try CasfsConfig.load(path: path).nodes["storage"] is DiskStorage)
        XCTAssertNil(try CasfsConfig.load(path: path).index)
    }

    /// Each bad config names the key and the line.
    func testErrorsNameKeyAndLine() {
        let cases: [(String, String, Int?)] = [
            ("storage: !lru-storage\n  size: 12X\n", "storage.size", 2),
            ("storage: !lru-storage\n  sise: 12M\n", "storage.sise", 2),
            ("mount:\n  writable: true\n", "missing `storage:`", nil),
            ("storage: !frobnicate-storage\n  path: x\n", "unknown storage tag !frobnicate-storage", 1),
            ("storage: !with-cache-storage\n  cache: !lru-storage\n    size: 1M\n", "missing `fallback:`", 1),
            ("storage: !redis-index\n  prefix: A\n  redis: !redis-connection\n    host: h\n  storage: !lru-storage\n    size: 1M\n",
             "storage.prefix", 2),
            ("storage: !redis-index\n  redis: !redis-connection\n    port: 99999\n    host: h\n  storage: !lru-storage\n    size: 1M\n",
             "storage.redis.port", 3),
            ("storage: !disk-storage\n  path: /tmp/x\nmount:\n  writable: maybe\n", "mount.writable", 4),
            ("storage: !disk-storage\n  path: /tmp/x\nmount:\n  negative-timeout: soon\n", "mount.negative-timeout", 4),
            ("storage: !disk-storage\n  path: /tmp/x\nmount:\n  tree-cache-size: 1K\n", "mount.tree-cache-size", 4),
            ("storage: !disk-storage\n  path: /tmp/x\nextra: 1\n", "extra", 3),
            ("storage: !disk-storage\n  path: [unclosed\n", "invalid YAML", 3),
            ("storage: !disk-storage\n  path: *nowhere\n", "invalid YAML", nil),
            ("storage: !with-cache-storage\n  cache: !lru-storage\n    size: 1M\n  fallback: 3\n", "storage.fallback", 4),
            ("storage: !redis-index\n  redis: !lru-storage\n    size: 1M\n  storage: !lru-storage\n    size: 1M\n", "storage.redis", 2),
            ("", "empty", nil),
        ]
        for (yaml, expected, line) in cases {
            XCTAssertThrowsError(try CasfsConfig.parse(yaml: yaml, source: "t.yaml"), yaml) { e in
                let text = "\(e)"
                XCTAssertTrue(text.contains(expected), "\(text) lacks \(expected)")
                if let line {
                    XCTAssertTrue(text.hasPrefix("t.yaml:\(line):"), "\(text) should start with t.yaml:\(line):")
                }
            }
        }
    }

    func testMissingFile() {
        XCTAssertThrowsError(try CasfsConfig.load(path: dir + "/absent.yaml")) { e in
            XCTAssertTrue("\(e)".contains("cannot read"), "\(e)")
        }
    }

    func testSizesAndDurations() {
        XCTAssertEqual(parseByteSize("4096"), 4096)
        XCTAssertEqual(parseByteSize("2K"), 2048)
        XCTAssertEqual(parseByteSize("512M"), 512 << 20)
        XCTAssertEqual(parseByteSize("2GB"), 2 << 30)
        XCTAssertEqual(parseByteSize("1GiB"), 1 << 30)
        XCTAssertEqual(parseByteSize("1.5g"), 3 << 29)
        XCTAssertEqual(parseByteSize("1T"), 1 << 40)
        for bad in ["", "M", "12X", "-1", "1.5", "1iB", "1e3", "１K"] { XCTAssertNil(parseByteSize(bad), bad) }
        XCTAssertEqual(parseDuration("90s"), 90)
        XCTAssertEqual(parseDuration("15m"), 900)
        XCTAssertEqual(parseDuration("2h"), 7200)
        XCTAssertEqual(parseDuration("7d"), 604_800)
        XCTAssertEqual(parseDuration("0.5"), 0.5)
        for bad in ["", "s", "5w", "-1s", "1 h"] { XCTAssertNil(parseDuration(bad), bad) }
    }
}
