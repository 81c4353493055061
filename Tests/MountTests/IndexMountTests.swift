import CASCore
import CASStorage
import Foundation
import TestSupport
import XCTest

/// The Redis index as the commands and a mount see it: blob counts on a
/// shared Redis, rebuilding a partly lost index, authentication.
final class IndexMountTests: MountTestCase {
    var casfs: String { (try? casfsBinary()) ?? "casfs" }

    func configFile(_ config: String, name: String) throws -> String {
        let p = tmp + "/" + name
        try config.write(toFile: p, atomically: true, encoding: .utf8)
        return p
    }

    func indexedConfig(port: Int, prefix: String? = nil, store: String) -> String {
        """
        storage: !redis-index
          redis: !redis-connection
            host: 127.0.0.1
            port: \(port)
        \(prefix.map { "  prefix: \($0)" } ?? "")
          storage: !disk-storage
            path: \(store)
        mount:
          writable: true

        """
    }

    /// `n` blobs in a new directory, as files named by their digests.
    func blobFiles(_ n: Int, seed: UInt64) throws -> (dir: String, digests: [Digest]) {
        let dir = "\(tmp)/blobs-\(seed)"
        var digests: [Digest] = []
        for i in 0..<n {
            let data = randomData(500 + (i * 7919) % 20_000, seed: seed &* 10_000 &+ UInt64(i))
            digests.append(try writeLocalBlob(data, in: dir, name: Digest.of(data).description).digest)
        }
        return (dir, digests)
    }

    func statLine(_ output: String, _ label: String) -> String? {
        output.split(separator: "\n").first { $0.hasPrefix(label) }.map {
            $0.dropFirst(label.count).trimmingCharacters(in: .whitespaces)
        }
    }

    /// A Redis shared with 500 keys that are not this index's blobs (other
    /// prefixes, look-alikes, malformed names, counters): `casfs stat` and
    /// the mount's statfs count only the index's own blobs, for the default
    /// prefix and for another one.
    func testBlobCountIgnoresUnrelatedKeysAndOtherPrefixes() throws {
        let r = try startRedis()
        var junk: [String] = []
        for i in 0..<250 { junk.append("SET junk:\(i) \(i)") }
        for i in 0..<150 { junk.append("SET Ax:\(Digest.of(Data("ax \(i)".utf8))) 1") }
        for i in 0..<50 { junk.append("SET A:not-a-digest-\(i) 1") }
        for i in 0..<48 { junk.append("SET other-index:\(Digest.of(Data("o \(i)".utf8))) 1") }
        junk.append("SET other-index:total_size 12345")
        junk.append("SET unrelated 1")
        let load = runShell("printf '%s\\n' \(junk.map(shq).joined(separator: " ")) | redis-cli -p \(r.port) > /dev/null")
        XCTAssertTrue(load.ok, "\(load)")
        XCTAssertEqual(junk.count, 500)

        let plain = indexedConfig(port: r.port, store: tmp + "/store-a")
        let prefixed = indexedConfig(port: r.port, prefix: "other", store: tmp + "/store-b")
        let m1 = try mount(plain, name: "plain")
        let m2 = try mount(prefixed, name: "prefixed")
        let (dirA, a) = try blobFiles(20, seed: 1)
        let (dirB, b) = try blobFiles(7, seed: 2)
        for d in a { mustSh("cp \(shq(dirA))/\(d) \(shq(m1.path(d)))") }
        for d in b { mustSh("cp \(shq(dirB))/\(d) \(shq(m2.path(d)))") }
        XCTAssertEqual(r.cli("EXISTS other:\(b[0])"), "1\n", "the prefixed index does not write <prefix>:<digest> keys")

        for (config, m, expected, name) in [(plain, m1, a, "plain"), (prefixed, m2, b, "prefixed")] {
            let cfg = try configFile(config, name: "\(name).yaml")
            let out = mustSh("\(shq(casfs)) stat --config \(shq(cfg))")
            XCTAssertEqual(statLine(out, "blobs:"), "\(expected.count)", "\(name): \(out)")
            XCTAssertTrue(statLine(out, "total size:")?.hasSuffix("(\(expected.map(\.size).reduce(0, +)) bytes)") == true, "\(name): \(out)")
            // Used files are the blobs; the free ones are the store's (df -i is not 100% used).
            XCTAssertEqual(usedFiles(m.mountpoint), expected.count, "\(name): statfs files")
            let df = mustSh("df --output=iused \(shq(m.mountpoint)) | tail -1").trimmingCharacters(in: .whitespacesAndNewlines)
            XCTAssertEqual(df, "\(expected.count)", "\(name): df -i")
            XCTAssertEqual(Set(mustSh("ls \(shq(m.sha256))").split(separator: "\n").map(String.init)), Set(expected.map(\.description)),
                           "\(name): listing")
        }
    }

    /// Half the index lost (its keys deleted, the counter left as it was):
    /// `casfs reindex` brings every blob back and sets total_size right.
    func testReindexBringsBackHalfALostIndex() throws {
        let r = try startRedis()
        let config = try indexedDiskConfig()
        let cfg = try configFile(config, name: "cmd.yaml")
        let (dir, digests) = try blobFiles(200, seed: 3)
        mustSh("\(shq(casfs)) put --quiet --config \(shq(cfg)) \(shq(dir)) > /dev/null")
        let total = digests.map(\.size).reduce(0, +)
        XCTAssertEqual(r.cli("GET total_size"), "\(total)\n")
        let lost = digests.enumerated().filter { $0.offset % 2 == 0 }.map(\.element)
        mustSh("redis-cli -p \(r.port) DEL \(lost.map { "A:\($0)" }.joined(separator: " "))")
        XCTAssertEqual(r.cli("--scan --pattern 'A:*'").split(separator: "\n").count, 100)

        let out = mustSh("\(shq(casfs)) reindex --config \(shq(cfg))")
        XCTAssertTrue(out.contains("added 100 blobs"), out)
        XCTAssertTrue(out.contains("dropped 0 entries"), out)
        for d in digests { XCTAssertTrue(try indexed(d), "\(d) not back in the index") }
        XCTAssertEqual(r.cli("GET total_size"), "\(total)\n")
        let m = try mount(config)
        XCTAssertEqual(mustSh("ls \(shq(m.sha256)) | wc -l").trimmingCharacters(in: .whitespaces), "200\n")
        for d in lost.prefix(10) { XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n") }
    }

    /// The same loss on the zero-config store: the next zero-config mount
    /// brings every blob back (in the background) with the right total.
    func testZeroConfigRemountBringsBackHalfALostIndex() throws {
        let mp = tmp + "/zc"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        defer { if isFuseMounted(mp) { _ = sh("fusermount3 -u \(shq(mp)) || fusermount3 -uz \(shq(mp))") } }
        let env = "XDG_DATA_HOME=\(shq(tmp + "/xdg"))"
        let data = tmp + "/xdg/casfs"
        let socket = data + "/redis/redis.sock"
        let (dir, digests) = try blobFiles(200, seed: 4)
        let total = digests.map(\.size).reduce(0, +)
        mustSh("\(env) \(shq(casfs)) mount --log-file \(shq(tmp + "/zc.log")) \(shq(mp))")
        for d in digests { mustSh("cp \(shq(dir))/\(d) \(shq(mp))/sha256/\(d)") }
        XCTAssertEqual(mustSh("redis-cli -s \(shq(socket)) GET total_size"), "\(total)\n")
        let lost = digests.enumerated().filter { $0.offset % 2 == 1 }.map(\.element)
        mustSh("redis-cli -s \(shq(socket)) DEL \(lost.map { "A:\($0)" }.joined(separator: " "))")
        mustSh("redis-cli -s \(shq(socket)) SET total_size 1")
        XCTAssertEqual(mustSh("redis-cli -s \(shq(socket)) DBSIZE"), "101\n")
        mustSh("fusermount3 -u \(shq(mp))")
        XCTAssertTrue(pollUntil(30) { !FileManager.default.fileExists(atPath: socket) || !sh("redis-cli -s \(shq(socket)) PING").ok },
                      "the private Redis did not stop at unmount")

        mustSh("\(env) \(shq(casfs)) mount --log-file \(shq(tmp + "/zc.log")) \(shq(mp))")
        let back = pollUntil(120) {
            sh("redis-cli -s \(shq(socket)) DBSIZE").stdout == "201\n"
                && sh("redis-cli -s \(shq(socket)) GET total_size").stdout == "\(total)\n"
        }
        XCTAssertTrue(back, "not rebuilt: DBSIZE \(sh("redis-cli -s \(shq(socket)) DBSIZE").stdout) total_size \(sh("redis-cli -s \(shq(socket)) GET total_size").stdout)")
        XCTAssertEqual(mustSh("ls \(shq(mp))/sha256 | wc -l").trimmingCharacters(in: .whitespaces), "200\n")
        XCTAssertTrue(pollUntil(60) { usedFiles(mp) == 200 }, "statfs used files: \(String(describing: usedFiles(mp)))")
        for d in lost.prefix(10) { XCTAssertEqual(mustSh("sha256sum < \(shq(mp))/sha256/\(d) | cut -c1-64"), d.hash + "\n") }
        mustSh("fusermount3 -u \(shq(mp))")
    }

    /// `password: !read-file` (BuildGrid's tag: the file's text, trimmed)
    /// authenticates to a Redis started with requirepass; a wrong one is refused.
    func testPasswordFromAFileAuthenticates() throws {
        let secret = "pw-\(UUID().uuidString)"
        let server = try RedisServer.tcp(password: secret)
        defer { server.stop() }
        let port = try XCTUnwrap(server.port)
        try "\(secret)\n".write(toFile: tmp + "/redis-password", atomically: true, encoding: .utf8)
        try "wrong-\(secret)\n".write(toFile: tmp + "/wrong-password", atomically: true, encoding: .utf8)
        func config(_ file: String) -> String {
            """
            storage: !redis-index
              redis: !redis-connection
                host: 127.0.0.1
                port: \(port)
                password: !read-file \(file)
              storage: !disk-storage
                path: \(storeDir)
            mount:
              writable: true

            """
        }
        let m = try mount(config(tmp + "/redis-password"))
        let (src, d) = try localBlob(randomData(30_000, seed: 9))
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        XCTAssertEqual(mustSh("redis-cli -p \(port) -a \(shq(secret)) --no-auth-warning EXISTS A:\(d)"), "1\n")
        let cfg = try configFile(config(tmp + "/redis-password"), name: "good.yaml")
        XCTAssertEqual(statLine(mustSh("\(shq(casfs)) stat --config \(shq(cfg))"), "blobs:"), "1")

        let bad = try configFile(config(tmp + "/wrong-password"), name: "bad.yaml")
        let refused = sh("\(shq(casfs)) stat --config \(shq(bad))")
        XCTAssertFalse(refused.ok, "a wrong password was accepted: \(refused)")
        XCTAssertTrue(refused.stderr.lowercased().contains("pass") || refused.stderr.contains("AUTH") || refused.stderr.contains("auth"),
                      "the error does not say authentication failed: \(refused.stderr)")
    }

    /// Files in use on a mount (statfs total minus free): its blob count.
    func usedFiles(_ mountpoint: String) -> Int? {
        let f = sh("stat -f -c '%c %d' \(shq(mountpoint))").stdout.split(separator: " ").compactMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        return f.count == 2 ? f[0] - f[1] : nil
    }
}
