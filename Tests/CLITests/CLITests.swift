import CASCore
import CASStorage
import Foundation
import Redis
import TestSupport
import XCTest

/// `casfs put`, `stat` and `cleanup` run as a user runs them, against a real redis-server.
final class CLITests: XCTestCase {
    var dir = ""
    var redis: RedisServer!
    var casfs = ""

    override func setUpWithError() throws {
        casfs = try casfsBinary()
        dir = try makeMountTempDir("casfs-cli")
        redis = try RedisServer.tcp()
        let config = """
        storage: !redis-index
          redis: !redis-connection
            host: 127.0.0.1
            port: \(redis.port!)
          storage: !disk-storage
            path: \(dir)/store
        """
        try config.write(toFile: dir + "/casfs.yaml", atomically: true, encoding: .utf8)
    }

    override func tearDown() {
        redis?.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    func cli(_ args: String) -> ShellResult {
        runShell("\(shq(casfs)) \(args)")
    }

    var configArg: String { "--config \(shq(dir + "/casfs.yaml"))" }

    func write(_ path: String, _ data: Data) throws {
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try data.write(to: URL(fileURLWithPath: path))
    }

    func testPutTreePrintsDigestsAndStoresThem() throws {
        let tree = dir + "/tree"
        var files: [String: Data] = [:]
        for i in 0..<30 { files["\(tree)/d\(i % 3)/f\(i)"] = Data("small file \(i)\n".utf8) }
        var big = Data(count: 3 << 20)
        big.withUnsafeMutableBytes { b in for i in 0..<b.count { b[i] = UInt8(truncatingIfNeeded: i &* 2654435761 >> 7) } }
        files["\(tree)/big.bin"] = big
        files["\(tree)/empty"] = Data()
        for (p, d) in files { try write(p, d) }

        let r = cli("put \(configArg) \(shq(tree))")
        XCTAssertTrue(r.ok, "\(r)")
        let lines = r.stdout.split(separator: "\n")
        XCTAssertEqual(lines.count, files.count)
        XCTAssertFalse(r.stderr.contains("["), "no progress bar when not on a terminal: \(r.stderr)")
        for line in lines {
            let parts = line.components(separatedBy: "  ")
            XCTAssertEqual(parts.count, 2, String(line))
            let data = try XCTUnwrap(files[parts[1]], "unexpected path \(parts[1])")
            XCTAssertEqual(parts[0], "sha256/\(Digest.of(data))")
        }
        let pool = redis.pool()
        let index = try RedisIndex(redis: pool, storage: try DiskStorage(root: dir + "/store"))
        // The empty blob is never indexed (as in BuildGrid); every other one is.
        XCTAssertEqual(try index.missingBlobs(files.values.map { Digest.of($0) }.filter { !$0.isEmpty }), [])
        XCTAssertEqual(try index.getBlob(Digest.of(big))?.computeDigest(), Digest.of(big))
        XCTAssertEqual(try index.totalSize(), Int64(files.values.map(\.count).reduce(0, +)))

        let s = cli("stat \(configArg) --json")
        XCTAssertTrue(s.ok, "\(s)")
        let obj = try JSONSerialization.jsonObject(with: Data(s.stdout.utf8)) as? [String: Int64]
        XCTAssertEqual(obj?["blob_count"], Int64(files.count - 1), "the empty blob is never indexed")
        XCTAssertEqual(obj?["total_size"], Int64(files.values.map(\.count).reduce(0, +)))
        let human = cli("stat \(configArg)")
        XCTAssertTrue(human.stdout.contains("blobs:       \(files.count - 1)"), "\(human)")
    }

    func testPutNamesEachFailedFile() throws {
        try write(dir + "/ok", Data("fine".utf8))
        let r = cli("put \(configArg) \(shq(dir + "/ok")) \(shq(dir + "/missing"))")
        XCTAssertEqual(r.status, 1, "\(r)")
        XCTAssertTrue(r.stderr.contains("missing"), "\(r)")
        redis.stop()
        let down = cli("put \(configArg) \(shq(dir + "/ok"))")
        XCTAssertNotEqual(down.status, 0, "\(down)")
        XCTAssertTrue(down.stderr.contains(dir + "/ok"), "the failed file is named: \(down)")
    }

    /// Blobs aged by TTL (written by casfs or by BuildGrid's own RedisIndex) are
    /// deleted, recently used ones are protected, and a dry run deletes nothing.
    func testCleanupDeletesExactlyTheAgedBlobs() throws {
        let pool = redis.pool()
        let venv = try BuildGridVenv.get()
        let script = BuildGridVenv.packageRoot + "/Tests/python/buildgrid_index.py"
        func blob(_ s: String) -> (Digest, Data) { let d = Data(s.utf8); return (Digest.of(d), d) }
        let mine = (0..<6).map { blob("casfs blob \($0) " + String(repeating: "x", count: $0 * 100)) }
        let theirs = (0..<4).map { blob("buildgrid blob \($0) " + String(repeating: "y", count: $0 * 50)) }
        for (i, (_, data)) in mine.enumerated() { try write("\(dir)/in/\(i)", data) }
        XCTAssertTrue(cli("put \(configArg) \(shq(dir + "/in"))").ok)
        let ops = "[[\"bulk_update_blobs\", [" + theirs.map { "[\"\($0.0)\", \"\($0.1.map { String(format: "%02x", $0) }.joined())\"]" }.joined(separator: ",") + "]]]"
        let out = try venv.run(script: script, arguments: ["--port", String(redis.port!), "--disk", dir + "/store"], stdin: ops)
        XCTAssertEqual(out.status, 0, out.stderr)

        // Age half of each side's blobs to 10 days ago.
        let aged = [mine[0], mine[2], mine[4], theirs[1], theirs[3]]
        for (d, _) in aged { _ = try pool.command(["EXPIRE", .string("A:\(d)"), .integer(RedisIndex.ttlSeconds - 10 * 86_400)]).checked() }
        let agedBytes = aged.map { $0.0.size }.reduce(0, +)
        let total = (mine + theirs).map { $0.0.size }.reduce(0, +)
        let index = try RedisIndex(redis: pool, storage: try DiskStorage(root: dir + "/store"))
        XCTAssertEqual(try index.totalSize(), total)

        let dry = cli("cleanup \(configArg) --high-watermark 1 --low-watermark 0 --protect-after 1d --dry-run")
        XCTAssertTrue(dry.ok, "\(dry)")
        XCTAssertTrue(dry.stdout.contains("would delete"), dry.stdout)
        XCTAssertTrue(dry.stdout.contains("(\(agedBytes) bytes)"), "dry run reports the aged bytes: \(dry.stdout)")
        let listed = Set(dry.stdout.split(separator: "\n").filter { $0.hasPrefix("would delete sha256/") }.map { String($0.dropFirst("would delete sha256/".count)) })
        XCTAssertEqual(listed, Set(aged.map { $0.0.description }), "a dry run names exactly the aged blobs")
        XCTAssertEqual(try index.totalSize(), total, "a dry run deletes nothing")
        for (d, _) in aged { XCTAssertTrue(try index.hasBlob(d)) }  // EXISTS: does not refresh access time

        let below = cli("cleanup \(configArg) --high-watermark \(total) --low-watermark 0")
        XCTAssertTrue(below.stdout.contains("nothing to do"), "\(below)")
        XCTAssertEqual(try index.totalSize(), total)

        let r = cli("cleanup \(configArg) --high-watermark 1 --low-watermark 0 --protect-after 1d")
        XCTAssertTrue(r.ok, "\(r)")
        XCTAssertEqual(r.stdout.split(separator: "\n").filter { $0.hasPrefix("deleted sha256/") }.count, aged.count, r.stdout)
        for (d, _) in mine + theirs {
            XCTAssertEqual(try index.hasBlob(d), !aged.contains { $0.0 == d }, "\(d)")
        }
        XCTAssertEqual(try index.totalSize(), total - agedBytes)
        for (d, _) in aged {
            XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: dir + "/store", d)), "bytes deleted too")
        }
        // The large-blob rule: blobs over 300 bytes not used for 1 s go even though they are protected.
        sleep(2)
        let large = cli("cleanup \(configArg) --high-watermark 1 --low-watermark 0 --protect-after 1d --large-blob-threshold 300 --large-blob-lifetime 1s")
        XCTAssertTrue(large.ok, "\(large)")
        let survivors = (mine + theirs).filter { d in !aged.contains { $0.0 == d.0 } }
        for (d, _) in survivors {
            XCTAssertEqual(try index.hasBlob(d), d.size <= 300, "\(d)")
        }
    }

    func testBadInputIsOneLineAndNonZero() throws {
        let cases: [(String, String)] = [
            ("cleanup \(configArg) --high-watermark 10Q --low-watermark 1", "'10Q' is not a size"),
            ("cleanup \(configArg) --high-watermark 1K --low-watermark 2K", "must not be above"),
            ("cleanup \(configArg) --high-watermark 1K --low-watermark 1 --protect-after 3w", "'3w' is not a duration"),
            ("stat --config \(shq(dir + "/absent.yaml"))", "absent.yaml"),
            ("put --config \(shq(dir + "/absent.yaml")) /etc/hostname", "absent.yaml"),
            ("mount --config \(shq(dir + "/casfs.yaml")) \(shq(dir + "/no-such-dir"))", "no-such-dir"),
            ("mount --config \(shq(dir + "/casfs.yaml")) -o bogus=1 \(shq(dir))", "bogus"),
        ]
        for (args, expected) in cases {
            let r = cli(args)
            XCTAssertNotEqual(r.status, 0, args)
            let lines = r.stderr.split(separator: "\n").filter { !$0.contains(" info ") }
            XCTAssertEqual(lines.count, 1, "one line for \(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(expected), "\(args): \(r.stderr)")
        }
        XCTAssertEqual(try redis.pool().command("DBSIZE").integerValue(), 0, "nothing changed")
    }
}
