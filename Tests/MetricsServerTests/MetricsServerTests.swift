import CASCore
import Foundation
import MetricsServer
import Synchronization
import TestSupport
import XCTest

/// The HTTP endpoint alone, over real sockets, with curl and bash's
/// /dev/tcp as clients.
final class MetricsServerTests: XCTestCase {
    var metrics: Metrics!
    var servers: [MetricsServer] = []

    override func setUpWithError() throws {
        guard runShell("command -v curl").ok else {
            throw TestSupportError("curl is not installed: these tests need it (apt-get install curl)")
        }
        metrics = Metrics()
    }

    override func tearDown() {
        for s in servers { s.stop() }
        servers = []
    }

    /// A server for `metrics` on 127.0.0.1 (a free port unless given).
    func start(host: String = "127.0.0.1", port: Int = 0) throws -> MetricsServer {
        let s = try MetricsServer.start(ListenAddress(host: host, port: port), metrics: metrics)
        servers.append(s)
        return s
    }

    /// `curl` with the response head written to a file: (status, headers, body).
    func fetch(_ url: String, _ curlOptions: String = "") throws -> (status: Int, headers: [String: String], body: String) {
        let dir = NSTemporaryDirectory() + "casfs-metrics-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = runShell("curl -sS -g \(curlOptions) -D \(dir)/head -o \(dir)/body -w '%{http_code}' \(shq(url))")
        guard r.ok, let status = Int(r.stdout) else { throw TestSupportError("curl \(url): \(r)") }
        let head = try String(contentsOfFile: dir + "/head", encoding: .utf8)
        var headers: [String: String] = [:]
        for line in head.split(separator: "\r\n").dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        let body = (try? String(contentsOfFile: dir + "/body", encoding: .utf8)) ?? ""
        return (status, headers, body)
    }

    /// Sends `request` over a plain TCP connection and returns everything the
    /// server sent until it closed the connection.
    func raw(_ port: Int, _ request: String) -> ShellResult {
        let escaped = request.replacingOccurrences(of: "\r\n", with: "\\r\\n")
        return runShell("exec 3<>/dev/tcp/127.0.0.1/\(port); printf '\(escaped)' >&3; cat <&3")
    }

    func testServesTheExpositionWithPrometheusContentType() throws {
        let read = metrics.counter(MetricCatalog.readBytes)
        read.add(1234)
        let h = metrics.histogram(MetricCatalog.fuseDuration, [("op", "read")],
                                  buckets: [.microseconds(100), .milliseconds(1), .milliseconds(10)])
        h.record(.microseconds(500))
        h.record(.milliseconds(20))
        let s = try start()
        let r = try fetch("http://127.0.0.1:\(s.port)/metrics")
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        XCTAssertEqual(r.headers["content-length"], String(r.body.utf8.count))
        XCTAssertEqual(r.body, metrics.exposition(), "the body is the registry's own exposition")
        let lines = Set(r.body.split(separator: "\n").map(String.init))
        XCTAssertTrue(lines.contains("# TYPE casfs_read_bytes_total counter"), r.body)
        XCTAssertTrue(lines.contains("casfs_read_bytes_total 1234"), r.body)
        XCTAssertTrue(lines.contains("# TYPE casfs_fuse_request_duration_seconds histogram"), r.body)
        XCTAssertTrue(lines.contains(#"casfs_fuse_request_duration_seconds_bucket{op="read",le="0.001"} 1"#), r.body)
        XCTAssertTrue(lines.contains(#"casfs_fuse_request_duration_seconds_bucket{op="read",le="+Inf"} 2"#), r.body)
        XCTAssertTrue(lines.contains(#"casfs_fuse_request_duration_seconds_count{op="read"} 2"#), r.body)

        // Every scrape renders anew.
        read.add(66)
        XCTAssertTrue(try fetch("http://127.0.0.1:\(s.port)/metrics").body.contains("casfs_read_bytes_total 1300\n"))
    }

    func testGaugesAreRefreshedBeforeEachScrape() throws {
        let gauge = metrics.gauge(MetricCatalog.memoryBlobs, [("node", "storage")])
        let value = Mutex<Int64>(7)
        metrics.onCollect { gauge.set(value.withLock { $0 }) }
        let s = try start()
        XCTAssertTrue(try fetch("http://127.0.0.1:\(s.port)/metrics").body.contains("casfs_memory_blobs{node=\"storage\"} 7.0\n"))
        value.withLock { $0 = 9 }
        XCTAssertTrue(try fetch("http://127.0.0.1:\(s.port)/metrics").body.contains("casfs_memory_blobs{node=\"storage\"} 9.0\n"))
    }

    func testQueryStringIsIgnored() throws {
        metrics.counter(MetricCatalog.readBytes).add(5)
        let s = try start()
        let r = try fetch("http://127.0.0.1:\(s.port)/metrics?name[]=casfs_read_bytes_total")
        XCTAssertEqual(r.status, 200)
        XCTAssertTrue(r.body.contains("casfs_read_bytes_total 5\n"))
    }

    func testOtherPathsAre404() throws {
        let s = try start()
        for path in ["/", "/metrics/", "/metricsx", "/stats", "/favicon.ico"] {
            let r = try fetch("http://127.0.0.1:\(s.port)\(path)")
            XCTAssertEqual(r.status, 404, path)
            XCTAssertFalse(r.body.contains("# TYPE"), path)
        }
        XCTAssertEqual(try fetch("http://127.0.0.1:\(s.port)/other", "-X POST").status, 404)
    }

    func testOtherMethodsAre405() throws {
        let s = try start()
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
            let r = try fetch("http://127.0.0.1:\(s.port)/metrics", "-X \(method)")
            XCTAssertEqual(r.status, 405, method)
            XCTAssertEqual(r.headers["allow"], "GET, HEAD", method)
        }
    }

    func testHeadHasTheHeadersOfGetAndNoBody() throws {
        metrics.counter(MetricCatalog.readBytes).add(42)
        let s = try start()
        let get = try fetch("http://127.0.0.1:\(s.port)/metrics")
        // HTTP/1.0 without keep-alive: the server closes after the reply, so
        // `cat` returns exactly what was sent.
        let r = raw(s.port, "HEAD /metrics HTTP/1.0\r\n\r\n")
        XCTAssertTrue(r.ok, "\(r)")
        XCTAssertTrue(r.stdout.hasPrefix("HTTP/1.1 200 OK\r\n"), r.stdout)
        XCTAssertTrue(r.stdout.hasSuffix("\r\n\r\n"), "no body after the head: \(r.stdout)")
        XCTAssertTrue(r.stdout.lowercased().contains("content-length: \(get.body.utf8.count)\r\n"), r.stdout)
        XCTAssertTrue(r.stdout.lowercased().contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"), r.stdout)
        XCTAssertTrue(r.stdout.lowercased().contains("connection: close\r\n"), r.stdout)
    }

    func testKeepAliveServesSeveralRequestsOnOneConnection() throws {
        let s = try start()
        let url = "http://127.0.0.1:\(s.port)/metrics"
        let r = runShell("curl -sS -o /dev/null -o /dev/null -o /dev/null -w '%{http_code} %{num_connects}\\n' \(url) \(url) \(url)")
        XCTAssertTrue(r.ok, "\(r)")
        XCTAssertEqual(r.stdout, "200 1\n200 0\n200 0\n", "one connection for three requests")
    }

    func testGarbageIsABadRequest() throws {
        let s = try start()
        let r = raw(s.port, "NOT HTTP AT ALL\r\n\r\n")
        XCTAssertTrue(r.stdout.hasPrefix("HTTP/1.1 400"), "\(r)")
        // And the server still serves.
        XCTAssertEqual(try fetch("http://127.0.0.1:\(s.port)/metrics").status, 200)
    }

    func testIPv6AndHostNames() throws {
        let v6 = try start(host: "::1")
        XCTAssertEqual(v6.address.description, "[::1]:0")
        XCTAssertEqual(try fetch("http://[::1]:\(v6.port)/metrics").status, 200)
        let named = try start(host: "localhost")
        XCTAssertEqual(try fetch("http://localhost:\(named.port)/metrics").status, 200)
    }

    func testBindsOnlyTheGivenAddress() throws {
        let s = try start(host: "127.0.0.1")
        // The same port on another loopback address is not served.
        let r = runShell("curl -sS -o /dev/null --connect-timeout 20 http://127.0.0.2:\(s.port)/metrics")
        XCTAssertFalse(r.ok, "127.0.0.2 answered: \(r)")
        let ss = runShell("ss -Hltn")
        XCTAssertTrue(ss.ok, "\(ss)")
        let ours = ss.stdout.split(separator: "\n").filter { $0.contains(":\(s.port) ") }
        XCTAssertEqual(ours.count, 1, ss.stdout)
        XCTAssertTrue(ours.first?.contains("127.0.0.1:\(s.port) ") ?? false, ss.stdout)
    }

    func testAddressInUseIsOneClearError() throws {
        let first = try start()
        XCTAssertThrowsError(try start(port: first.port)) { e in
            XCTAssertEqual("\(e)", "cannot serve metrics on 127.0.0.1:\(first.port): the address is already in use")
        }
        // The first one is unharmed.
        XCTAssertEqual(try fetch("http://127.0.0.1:\(first.port)/metrics").status, 200)
    }

    func testAddressOfAnotherMachineIsOneClearError() throws {
        // TEST-NET-1: never an address of this machine; binding sends nothing.
        XCTAssertThrowsError(try start(host: "192.0.2.1", port: 9100)) { e in
            XCTAssertEqual("\(e)", "cannot serve metrics on 192.0.2.1:9100: not an address of this machine")
        }
    }

    func testUnknownHostIsOneClearError() throws {
        XCTAssertThrowsError(try start(host: "no-such-host.invalid", port: 9100)) { e in
            XCTAssertEqual("\(e)", "cannot serve metrics on no-such-host.invalid:9100: the host 'no-such-host.invalid' does not resolve")
        }
    }

    func testStopClosesThePortForGood() throws {
        let s = try start()
        let port = s.port
        XCTAssertEqual(try fetch("http://127.0.0.1:\(port)/metrics").status, 200)
        s.stop()
        s.stop()  // twice is harmless
        XCTAssertFalse(runShell("curl -sS -o /dev/null http://127.0.0.1:\(port)/metrics").ok, "still answering after stop")
        // The port is free again.
        let again = try start(port: port)
        XCTAssertEqual(try fetch("http://127.0.0.1:\(again.port)/metrics").status, 200)
    }
}
