import CASConfig
import CASCore
import CASStorage
import Foundation
import XCTest

/// BuildGrid's scalar tags, with BuildGrid's meanings.
final class ScalarTagTests: XCTestCase {
    var dir = ""

    override func setUp() {
        dir = NSTemporaryDirectory() + "casfs-tags-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func parse(_ yaml: String, env: [String: String] = [:]) throws -> ConfigSpec {
        try ConfigParser.parse(yaml: yaml, source: "t.yaml", environment: env)
    }

    func redis(_ spec: ConfigSpec) throws -> RedisSpec {
        guard case .redisIndex(_, let r, _) = spec.storage.kind else { throw XCTSkip("not an index") }
        return r
    }

    func indexYAML(_ redisKeys: String) -> String {
        """
        storage: !redis-index
          redis: !redis-connection
        \(redisKeys)
          storage: !lru-storage
            size: 1M
        """
    }

    func testReadFileGivesTheTrimmedContents() throws {
        try "  s3cret \n".write(toFile: dir + "/pw", atomically: true, encoding: .utf8)
        let spec = try parse(indexYAML("    host: 127.0.0.1\n    password: !read-file \(dir)/pw"))
        XCTAssertEqual(try redis(spec).password, "s3cret")
    }

    func testReadFileDoublesInnerLineBreaksAsBuildGridDoes() throws {
        try "a\nb\n\n".write(toFile: dir + "/two", atomically: true, encoding: .utf8)
        let spec = try parse(indexYAML("    host: 127.0.0.1\n    password: !read-file $D/two"), env: ["D": dir])
        XCTAssertEqual(try redis(spec).password, "a\n\nb")
    }

    func testMissingReadFileNamesFileLineAndKey() {
        XCTAssertThrowsError(try parse(indexYAML("    host: 127.0.0.1\n    password: !read-file \(dir)/absent"))) { e in
            let text = "\(e)"
            XCTAssertTrue(text.hasPrefix("t.yaml:4: storage.redis.password:"), text)
            XCTAssertTrue(text.contains("\(dir)/absent"), text)
        }
    }

    func testExpandVarsAndExpandPath() throws {
        let env = ["STORE": dir, "HOME": "/home/u", "PORT": "6380"]
        let spec = try parse("""
            storage: !redis-index
              redis: !redis-connection
                host: !expand-vars ${HOSTNAME_UNSET}x$UNSET
                port: !expand-vars $PORT
              storage: !disk-storage
                path: !expand-path $STORE/store
            """, env: env)
        let r = try redis(spec)
        XCTAssertEqual(r.host, "${HOSTNAME_UNSET}x$UNSET", "undefined variables stay as written")
        XCTAssertEqual(r.port, 6380)
        guard case .redisIndex(let inner, _, _) = spec.storage.kind, case .disk(let path) = inner.kind else { return XCTFail() }
        XCTAssertEqual(path, dir + "/store")
        let home = try parse("storage: !disk-storage\n  path: !expand-path ~/cas\n", env: env)
        guard case .disk(let p) = home.storage.kind else { return XCTFail() }
        XCTAssertEqual(p, "/home/u/cas")
        let literal = try parse(indexYAML("    host: !expand-vars ~/x"), env: env)
        XCTAssertEqual(try redis(literal).host, "~/x", "!expand-vars does not expand ~")
    }

    func testUnknownScalarTagIsAnError() {
        XCTAssertThrowsError(try parse(indexYAML("    host: 127.0.0.1\n    password: !env REDIS_PW"))) { e in
            let text = "\(e)"
            XCTAssertTrue(text.hasPrefix("t.yaml:4: storage.redis.password:"), text)
            XCTAssertTrue(text.contains("unknown tag !env"), text)
        }
    }

    func testUnsupportedBuildGridTagsAreNamed() {
        for tag in ["!s3-storage", "!sql-index", "!redis-storage"] {
            XCTAssertThrowsError(try parse("storage: \(tag)\n  x: 1\n")) { e in
                XCTAssertTrue("\(e)".contains("BuildGrid's \(tag) is not supported by casfs"), "\(e)")
            }
        }
    }

    func testDeferredWritesNeedAJournalUnlessTheCacheIsADisk() throws {
        XCTAssertThrowsError(try parse("""
            storage: !with-cache-storage
              cache: !lru-storage
                size: 1M
              fallback: !disk-storage
                path: \(dir)/f
              defer-fallback-writes: true
            """)) { e in XCTAssertTrue("\(e)".contains("journal"), "\(e)") }
        let stack = try CasfsConfig.parse(yaml: """
            storage: !with-cache-storage
              cache: !disk-storage
                path: \(dir)/cache
              fallback: !disk-storage
                path: \(dir)/f
              defer-fallback-writes: true
            """)
        let wc = try XCTUnwrap(stack.nodes["storage"] as? WithCacheStorage)
        XCTAssertEqual(wc.journal?.directory, "\(dir)/cache/casfs-journal")
    }
}
