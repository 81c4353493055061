import CASCore
import Foundation
import TestSupport
import XCTest

/// Every descriptor a mount daemon holds is close-on-exec, so nothing it
/// starts (a private Redis, fusermount3) inherits its sockets; and clients
/// of its metrics port cannot take its descriptors or memory.
final class DescriptorTests: MountTestCase {
    var bgd: BuildGridServer?

    override func tearDown() {
        bgd?.stop()
        bgd = nil
        super.tearDown()
    }

    /// The descriptors of `pid` above stderr that lack close-on-exec, with
    /// what they point to (from /proc/<pid>/fdinfo `flags:`, octal).
    func inheritable(_ pid: pid_t) -> [String] {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        var found: [String] = []
        for fd in fds.compactMap({ Int($0) }).sorted() where fd > 2 {
            guard let info = try? String(contentsOfFile: "/proc/\(pid)/fdinfo/\(fd)", encoding: .utf8),
                  let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags:") }),
                  let flags = Int(line.dropFirst("flags:".count).trimmingCharacters(in: .whitespaces), radix: 8) else { continue }
            if flags & 0o2000000 == 0 {
                let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)")) ?? "?"
                found.append("\(fd) -> \(target)")
            }
        }
        return found
    }

    /// The socket inodes `pid` holds.
    func sockets(_ pid: pid_t) -> Set<String> {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        return Set(fds.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)") }
            .filter { $0.hasPrefix("socket:") })
    }

    func testZeroConfigDaemonAndTheRedisItRestarts() throws {
        let port = try RedisServer.freePort()
        let m = try zeroConfigMount(options: ["metrics=127.0.0.1:\(port)"])
        let (pa, da) = try localBlob(randomData(70_000, seed: 80))
        mustSh("cp \(shq(pa)) \(shq(m.path(da)))")
        mustSh("cat \(shq(m.path(da))) > /dev/null && ls \(shq(m.sha256)) > /dev/null")
        let keepAlive = try TCPClient(port: port)
        keepAlive.send("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        XCTAssertNotNil(keepAlive.receiveResponse())
        XCTAssertTrue(pollUntil(30) { self.inheritable(m.pid).isEmpty }, "inheritable descriptors: \(inheritable(m.pid))")
        XCTAssertEqual(inheritable(m.pid), [])

        // The Redis the watchdog starts again holds none of the daemon's sockets.
        let first = try XCTUnwrap(m.redisPID())
        XCTAssertEqual(kill(first, SIGKILL), 0)
        XCTAssertTrue(pollUntil(60) { (m.redisPID().map { $0 != first && kill($0, 0) == 0 }) ?? false },
                      "the private Redis did not come back; log:\n\(m.log.suffix(2000))")
        let second = try XCTUnwrap(m.redisPID())
        XCTAssertTrue(pollUntil(30) { m.redis("PING").contains("PONG") })
        let shared = sockets(second).intersection(sockets(m.pid))
        XCTAssertEqual(shared, [], "the restarted redis-server holds sockets of the daemon")
        let owners = runShell("ss -Hltnp").stdout.split(separator: "\n").filter { $0.contains("127.0.0.1:\(port) ") }
        XCTAssertEqual(owners.count, 1, "\(owners)")
        XCTAssertTrue(owners.first?.contains("pid=\(m.pid),") ?? false, "\(owners)")
        XCTAssertFalse(owners.first?.contains("pid=\(second),") ?? true, "\(owners)")
        XCTAssertEqual(inheritable(second).filter { $0.contains("socket:") }, [], "sockets the restarted Redis inherited")
        m.unmount()
        XCTAssertTrue(pollUntil(30) { kill(second, 0) != 0 })
        // The next mount binds the port again.
        let again = try zeroConfigMount(name: "zc2", options: ["metrics=127.0.0.1:\(port)"])
        XCTAssertTrue(runShell("curl -sf -o /dev/null http://127.0.0.1:\(port)/metrics").ok, again.log)
    }

    func testConfiguredDaemonWithARemoteAndMetrics() throws {
        let server = try BuildGridServer(directory: tmp + "/bgd")
        bgd = server
        let port = try RedisServer.freePort()
        let r = try startRedis()
        let config = """
            storage: !with-cache-storage
              cache: !redis-index
                redis: !redis-connection
                  host: 127.0.0.1
                  port: \(r.port)
                storage: !disk-storage
                  path: \(storeDir)
              fallback: !remote-storage
                url: \(server.url)
                request-timeout: 60s
            mount:
              writable: true
              metrics-address: 127.0.0.1:\(port)

            """
        let m = try mount(config)
        let (pa, da) = try localBlob(randomData(200_000, seed: 81))
        mustSh("cp \(shq(pa)) \(shq(m.path(da)))")
        m.unmount()
        // Fetched from the remote on a fresh mount: the gRPC channel is open.
        try FileManager.default.removeItem(atPath: storeDir)
        mustSh("redis-cli -p \(r.port) FLUSHALL")
        try m.mount()
        mustSh("cmp \(shq(pa)) \(shq(m.path(da)))")
        XCTAssertTrue(runShell("curl -sf -o /dev/null http://127.0.0.1:\(port)/metrics").ok)
        XCTAssertTrue(sockets(m.pid).count >= 3, "listener, Redis and gRPC sockets: \(sockets(m.pid))")
        XCTAssertTrue(pollUntil(30) { self.inheritable(m.pid).isEmpty }, "inheritable descriptors: \(inheritable(m.pid))")
    }

    /// Clients that pipeline without reading, open more connections than
    /// allowed, send nothing or drip a head byte by byte: the daemon's
    /// memory and descriptors stay bounded and the mount serves throughout.
    func testHostileMetricsClientsCannotHurtTheMount() throws {
        let port = try RedisServer.freePort()
        let m = try mount(cachedDiskConfig() + "  metrics-address: 127.0.0.1:\(port)\n", options: ["rw"])
        let before = try XCTUnwrap(residentKiB(m.pid))
        let socketsBefore = sockets(m.pid).count

        // 12,000 pipelined scrapes, never read.
        let pipeliner = try TCPClient(port: port, timeout: 120)
        let requests = Array(String(repeating: "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n", count: 12_000).utf8)
        let sent = DispatchSemaphore(value: 0)
        let sender = Thread {
            _ = pipeliner.send(requests)
            sent.signal()
        }
        sender.start()
        // 200 connections more than the limit allows, held open and silent.
        var crowd: [TCPClient] = []
        for _ in 0..<200 { if let c = try? TCPClient(port: port, timeout: 60) { crowd.append(c) } }
        // A slowloris.
        let drip = try TCPClient(port: port, timeout: 5)
        drip.send("GET /metrics HTTP/1.1\r\nX-Slow: ")

        // The mount serves meanwhile.
        for i in 0..<5 {
            let (p, d) = try localBlob(randomData(100_000 + i, seed: 90 + UInt64(i)))
            mustSh("cp \(shq(p)) \(shq(m.path(d))) && cmp \(shq(p)) \(shq(m.path(d)))")
            _ = drip.send("a")
            usleep(300_000)
        }
        let held = sockets(m.pid).count
        XCTAssertLessThanOrEqual(held, socketsBefore + 32 + 4, "the daemon holds a socket per client: \(held)")

        // Silent connections and the slowloris are closed; the pipeliner is dropped.
        XCTAssertTrue(crowd.allSatisfy { $0.receiveUntilClosed().closed }, "a silent connection was kept")
        var dripClosed = false
        for _ in 0..<200 where !dripClosed {
            var b: UInt8 = 0
            let n = recv(drip.fd, &b, 1, Int32(MSG_DONTWAIT))
            dripClosed = n == 0 || (n < 0 && errno != EAGAIN) || !drip.send("a")
            if !dripClosed { usleep(300_000) }
        }
        XCTAssertTrue(dripClosed, "the slowloris connection was kept")
        // The pipeliner's requests fit in the socket buffers; the daemon answers
        // what the client's buffers take, then drops it for not reading.
        XCTAssertEqual(sent.wait(timeout: .now() + 180), .success, "the pipelined requests were not taken")
        XCTAssertTrue(pipeliner.waitUntilClosedByPeer(seconds: 120), "the pipelining client was never dropped")
        let after = try XCTUnwrap(residentKiB(m.pid))
        // The limits allow 32 connections × (8 KiB of head + one ~50 KiB reply):
        // a few MiB. 64 MiB is a generous bound; without limits this grew by GiBs.
        XCTAssertLessThan(after - before, 64 * 1024, "daemon RSS grew from \(before) KiB to \(after) KiB")
        XCTAssertTrue(runShell("curl -sf -o /dev/null http://127.0.0.1:\(port)/metrics").ok, "the port serves again")
        mustSh("ls \(shq(m.sha256)) > /dev/null")
    }
}
