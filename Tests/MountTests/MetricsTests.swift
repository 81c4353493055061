import CASCore
import Foundation
import TestSupport
import XCTest

/// A mount's metrics scraped over HTTP as Prometheus scrapes them, and its
/// readiness reported to a systemd notification socket.
final class MetricsTests: MountTestCase {
    struct Scrape {
        let status: Int
        let headers: [String: String]
        let body: String

        /// The sum of a metric's samples (all label sets), 0 when absent.
        func total(_ name: String) -> Double {
            var sum = 0.0
            for line in body.split(separator: "\n") where !line.hasPrefix("#") {
                guard let space = line.lastIndex(of: " "), let v = Double(line[line.index(after: space)...]) else { continue }
                let key = line[..<space]
                let base = key.firstIndex(of: "{").map { key[..<$0] } ?? key
                if base == name { sum += v }
            }
            return sum
        }

        func has(type name: String, _ kind: String) -> Bool {
            body.split(separator: "\n").contains { $0 == "# TYPE \(name) \(kind)" }
        }
    }

    func scrape(_ url: String, _ curlOptions: String = "") throws -> Scrape {
        let head = tmp + "/scrape-head", out = tmp + "/scrape-body"
        let r = runShell("curl -sS -g \(curlOptions) -D \(shq(head)) -o \(shq(out)) -w '%{http_code}' \(shq(url))")
        guard r.ok, let status = Int(r.stdout) else { throw MountError("curl \(url): \(r)") }
        var headers: [String: String] = [:]
        for line in try String(contentsOfFile: head, encoding: .utf8).split(separator: "\r\n").dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return Scrape(status: status, headers: headers, body: (try? String(contentsOfFile: out, encoding: .utf8)) ?? "")
    }

    /// The TCP addresses `pid` listens on, from `ss -ltnp`.
    func listening(_ pid: pid_t) throws -> [String] {
        let r = runShell("ss -Hltnp")
        guard r.ok else { throw MountError("ss -ltnp: \(r)") }
        return r.stdout.split(separator: "\n").filter { $0.contains("pid=\(pid),") }.map { line in
            String(line.split(separator: " ", omittingEmptySubsequences: true)[3])
        }.sorted()
    }

    func testScrapeFollowsABlobReadAndServesNothingElse() throws {
        try requireCurl()
        let port = try RedisServer.freePort()
        let m = try mount(cachedDiskConfig() + "  metrics-address: 127.0.0.1:\(port)\n")
        let url = "http://127.0.0.1:\(port)/metrics"
        let sockets = try listening(m.pid)
        XCTAssertEqual(sockets, ["127.0.0.1:\(port)"], "the daemon listens on the metrics port only")

        let data = randomData(300_001, seed: 61)
        let d = try placeInDiskStore(data)
        let before = try scrape(url)
        XCTAssertEqual(before.status, 200)
        XCTAssertEqual(before.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        XCTAssertTrue(before.has(type: "casfs_read_bytes_total", "counter"), before.body)

        let copy = tmp + "/copy"
        mustSh("cat \(shq(m.path(d))) > \(shq(copy))")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: copy)), data)

        let after = try scrape(url)
        XCTAssertEqual(after.status, 200)
        XCTAssertEqual(after.total("casfs_read_bytes_total") - before.total("casfs_read_bytes_total"), Double(data.count),
                       "bytes served for one cat of the blob")
        // The stats attribute reads the same registry.
        XCTAssertEqual(Double(try m.stats()["casfs_read_bytes_total"] ?? -1), after.total("casfs_read_bytes_total"))

        // A histogram family, where the filesystem records one.
        let histogram = "casfs_fuse_request_duration_seconds"
        if after.has(type: histogram, "histogram") {
            let lines = after.body.split(separator: "\n")
            XCTAssertTrue(lines.contains { $0.hasPrefix(histogram + "_bucket{") && $0.contains(#"le="+Inf""#) }, after.body)
            XCTAssertGreaterThan(lines.filter { $0.hasPrefix(histogram + "_bucket{") }.count, 1, "buckets besides +Inf")
            XCTAssertGreaterThan(after.total(histogram + "_count"), 0)
        } else {
            print("note: the mount exports no \(histogram) histogram")
        }

        XCTAssertEqual(try scrape("http://127.0.0.1:\(port)/other").status, 404)
        XCTAssertEqual(try listening(m.pid), sockets, "scrapes and reads opened no other port")
    }

    func testOptionOverridesTheConfigAndNothingListensWhenUnset() throws {
        try requireCurl()
        let plain = try mount(cachedDiskConfig(), name: "plain")
        XCTAssertEqual(try listening(plain.pid), [], "no metrics address, no listening socket")

        let port = try RedisServer.freePort()
        let configured = try RedisServer.freePort()
        let m = try mount(cachedDiskConfig() + "  metrics-address: 127.0.0.1:\(configured)\n",
                          options: ["ro,metrics=127.0.0.1:\(port)"], name: "option")
        XCTAssertEqual(try listening(m.pid), ["127.0.0.1:\(port)"])
        let s = try scrape("http://127.0.0.1:\(port)/metrics")
        XCTAssertEqual(s.status, 200)
        XCTAssertTrue(s.has(type: "casfs_read_bytes_total", "counter"), s.body)
    }

    func testRedisIndexNodeExportsItsConnections() throws {
        try requireCurl()
        let port = try RedisServer.freePort()
        let m = try mount(try indexedDiskConfig() + "  metrics-address: 127.0.0.1:\(port)\n")
        let src = try localBlob(randomData(5000, seed: 62))
        mustSh("cp \(shq(src.path)) \(shq(m.path(src.digest)))")
        let s = try scrape("http://127.0.0.1:\(port)/metrics")
        for name in ["casfs_redis_errors_total", "casfs_redis_retries_total", "casfs_redis_reconnects_total"] {
            XCTAssertTrue(s.has(type: name, "counter"), "\(name) missing:\n\(s.body)")
        }
        XCTAssertTrue(s.body.contains("casfs_redis_connections{node=\"storage\"} "), s.body)
        XCTAssertGreaterThan(s.total("casfs_redis_connections"), 0)
    }

    func testAddressInUseFailsTheMountWithOneLine() throws {
        let port = try RedisServer.freePort()
        let first = try mount(cachedDiskConfig() + "  metrics-address: 127.0.0.1:\(port)\n", name: "first")
        XCTAssertEqual(try listening(first.pid), ["127.0.0.1:\(port)"])

        let config = tmp + "/second.yaml"
        try cachedDiskConfig().write(toFile: config, atomically: true, encoding: .utf8)
        let mp = tmp + "/second"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        defer { if isFuseMounted(mp) { _ = sh("fusermount3 -uz \(shq(mp))") } }
        let r = sh("\(try casfsBinary()) mount --config \(shq(config)) --staging-dir \(shq(tmp)) --log-file \(shq(tmp + "/second.log")) -o metrics=127.0.0.1:\(port) \(shq(mp))")
        XCTAssertFalse(r.ok, "\(r)")
        XCTAssertEqual(r.stderr, "casfs: cannot serve metrics on 127.0.0.1:\(port): the address is already in use\n")
        XCTAssertFalse(isFuseMounted(mp))

        let bad = sh("\(try casfsBinary()) mount --config \(shq(config)) -o metrics=127.0.0.1 \(shq(mp))")
        XCTAssertFalse(bad.ok)
        XCTAssertEqual(bad.stderr, "casfs: -o metrics: '127.0.0.1' is not HOST:PORT: the port is missing\n")
        XCTAssertFalse(isFuseMounted(mp))
    }

    func testUnmountAndSigtermStopTheServer() throws {
        try requireCurl()
        let port = try RedisServer.freePort()
        let config = cachedDiskConfig() + "  metrics-address: 127.0.0.1:\(port)\n"
        let m = try mount(config, name: "unmount")
        XCTAssertEqual(try scrape("http://127.0.0.1:\(port)/metrics").status, 200)
        XCTAssertEqual(m.unmount(), 0, m.log)
        XCTAssertFalse(runShell("curl -sS -o /dev/null http://127.0.0.1:\(port)/metrics").ok, "served after unmount")

        let again = try mount(config, name: "sigterm")
        XCTAssertEqual(try scrape("http://127.0.0.1:\(port)/metrics").status, 200, "the port is free again")
        kill(again.pid, SIGTERM)
        XCTAssertTrue(pollUntil(30) { !again.isRunning }, "SIGTERM did not stop the daemon")
        XCTAssertEqual(again.process?.terminationStatus, 0, again.log)
        XCTAssertFalse(isFuseMounted(again.mountpoint))
        XCTAssertFalse(runShell("curl -sS -o /dev/null http://127.0.0.1:\(port)/metrics").ok, "served after SIGTERM")
    }

    func testReadinessIsSentToSystemd() throws {
        let socket = try NotifySocket(abstract: true)
        setenv("NOTIFY_SOCKET", socket.name, 1)
        defer { unsetenv("NOTIFY_SOCKET") }
        _ = try mount(cachedDiskConfig())
        unsetenv("NOTIFY_SOCKET")
        XCTAssertEqual(socket.receive(), "READY=1")
        XCTAssertNil(socket.receive(within: 1), "sent once")
    }

    func requireCurl() throws {
        guard runShell("command -v curl").ok else {
            throw MountError("curl is not installed: metrics tests scrape with it (apt-get install curl)")
        }
    }
}
