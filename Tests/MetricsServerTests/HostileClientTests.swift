import CASCore
import Foundation
import MetricsServer
import TestSupport
import XCTest

/// Clients that misbehave, over real sockets on 127.0.0.1: the server's
/// limits hold (connections, head and idle timeouts, one reply at a time).
/// Waits are bounded and generous; nothing is asserted about how fast.
final class HostileClientTests: XCTestCase {
    var servers: [MetricsServer] = []

    override func tearDown() {
        for s in servers { s.stop() }
        servers = []
    }

    func start(_ limits: MetricsServerLimits, body: String = "casfs_test 1\n") throws -> MetricsServer {
        let s = try MetricsServer.start(ListenAddress(host: "127.0.0.1", port: 0), limits: limits) { body }
        servers.append(s)
        return s
    }

    let get = "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n"

    func testConnectionsBeyondTheLimitAreRefusedAndTheFirstOnesStillServed() throws {
        let s = try start(MetricsServerLimits(maxConnections: 4, headerTimeout: 60, idleTimeout: 60))
        let held = try (0..<4).map { _ in try TCPClient(port: s.port) }
        XCTAssertTrue(pollUntil(30) { s.statistics.open == 4 })
        for _ in 0..<3 {
            let extra = try TCPClient(port: s.port)
            extra.send(get)
            let (bytes, closed) = extra.receiveUntilClosed()
            XCTAssertTrue(closed, "a connection over the limit is closed")
            XCTAssertTrue(String(decoding: bytes, as: UTF8.self).hasPrefix("HTTP/1.1 503") || bytes.isEmpty,
                          String(decoding: bytes, as: UTF8.self))
        }
        XCTAssertEqual(s.statistics.refused, 3)
        // The connections within the limit are served.
        held[0].send(get)
        XCTAssertEqual(held[0].receiveResponse()?.head.hasPrefix("HTTP/1.1 200"), true)
        // One goes: a new one is taken in its place.
        close(held[1].fd)
        XCTAssertTrue(pollUntil(30) { s.statistics.open == 3 })
        let next = try TCPClient(port: s.port)
        next.send(get)
        XCTAssertEqual(next.receiveResponse()?.head.hasPrefix("HTTP/1.1 200"), true)
    }

    func testAConnectionThatSendsNothingIsClosedAfterTheHeadTimeout() throws {
        let s = try start(MetricsServerLimits(headerTimeout: 1))
        let silent = try TCPClient(port: s.port, timeout: 60)
        let (bytes, closed) = silent.receiveUntilClosed()
        XCTAssertTrue(closed, "closed within the bounded wait")
        XCTAssertEqual(bytes, [])
        XCTAssertEqual(s.statistics.timedOut, 1)
    }

    /// A slowloris: one byte of header at a time, never the end of the head.
    func testAHeadDrippedByteByByteIsClosed() throws {
        let s = try start(MetricsServerLimits(headerTimeout: 1, idleTimeout: 1))
        let drip = try TCPClient(port: s.port, timeout: 5)
        XCTAssertTrue(drip.send("GET /metrics HTTP/1.1\r\nX-Slow: "))
        var closed = false
        for _ in 0..<150 {  // at most 30 s
            if !drip.send("a") {
                closed = true
                break
            }
            var b: UInt8 = 0
            let n = recv(drip.fd, &b, 1, Int32(MSG_DONTWAIT))
            if n == 0 || (n < 0 && errno != EAGAIN) {
                closed = true
                break
            }
            usleep(200_000)
        }
        XCTAssertTrue(closed, "a dripping head kept its connection")
        XCTAssertEqual(s.statistics.timedOut, 1)
        XCTAssertEqual(s.statistics.requests, 0)
    }

    func testAnIdleKeptAliveConnectionIsClosed() throws {
        let s = try start(MetricsServerLimits(idleTimeout: 1))
        let c = try TCPClient(port: s.port)
        c.send(get)
        XCTAssertEqual(c.receiveResponse()?.body, Array("casfs_test 1\n".utf8))
        let (_, closed) = c.receiveUntilClosed()
        XCTAssertTrue(closed)
    }

    /// Thousands of pipelined requests and no reading: the server answers
    /// what the socket buffers take, reads nothing more while a reply is
    /// unsent, and drops the connection once a reply is not taken in time.
    func testPipelinedRequestsWithoutReadingAreBackpressured() throws {
        let body = String(repeating: "casfs_filler_metric 1\n", count: 3000)  // 66 KB a reply
        let s = try start(MetricsServerLimits(sendTimeout: 2), body: body)
        let c = try TCPClient(port: s.port, timeout: 30)
        let requests = 10_000
        let pipelined = Array(String(repeating: get, count: requests).utf8)
        let sender = Thread {
            _ = c.send(pipelined)
        }
        sender.start()
        XCTAssertTrue(pollUntil(60) { s.statistics.timedOut == 1 }, "the connection that does not read was not dropped")
        let answered = s.statistics.requests
        XCTAssertGreaterThan(answered, 0)
        XCTAssertLessThan(answered, requests / 10, "replies were produced without the client taking them")
        XCTAssertEqual(s.statistics.open, 0)
    }

    /// Pipelined requests that are read are all answered, in order.
    func testPipelinedRequestsAreAnsweredInOrder() throws {
        let s = try start(.standard)
        let c = try TCPClient(port: s.port)
        let paths = (0..<200).map { $0 % 3 == 0 ? "/metrics" : $0 % 3 == 1 ? "/nope" : "/metrics?x=1" }
        c.send(paths.map { "GET \($0) HTTP/1.1\r\nHost: t\r\n\r\n" }.joined())
        for p in paths {
            let r = c.receiveResponse()
            XCTAssertEqual(r?.head.hasPrefix(p == "/nope" ? "HTTP/1.1 404" : "HTTP/1.1 200"), true, p)
        }
    }

    func testOversizedHeadsAndBodiesAreRefused() throws {
        let s = try start(MetricsServerLimits(maxHeadBytes: 1024, maxBodyBytes: 100))
        let big = try TCPClient(port: s.port)
        big.send("GET /metrics HTTP/1.1\r\nX: " + String(repeating: "a", count: 4000) + "\r\n\r\n")
        XCTAssertTrue(String(decoding: big.receiveUntilClosed().bytes, as: UTF8.self).hasPrefix("HTTP/1.1 431"))
        let body = try TCPClient(port: s.port)
        body.send("POST /metrics HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
        XCTAssertTrue(String(decoding: body.receiveUntilClosed().bytes, as: UTF8.self).hasPrefix("HTTP/1.1 413"))
        let chunked = try TCPClient(port: s.port)
        chunked.send("POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        XCTAssertTrue(String(decoding: chunked.receiveUntilClosed().bytes, as: UTF8.self).hasPrefix("HTTP/1.1 413"))
        let conflicting = try TCPClient(port: s.port)
        conflicting.send("POST /metrics HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
        XCTAssertTrue(String(decoding: conflicting.receiveUntilClosed().bytes, as: UTF8.self).hasPrefix("HTTP/1.1 400"))
        // A small body is read and dropped; the connection goes on.
        let small = try TCPClient(port: s.port)
        small.send("POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello" + get)
        XCTAssertEqual(small.receiveResponse()?.head.hasPrefix("HTTP/1.1 405"), true)
        XCTAssertEqual(small.receiveResponse()?.head.hasPrefix("HTTP/1.1 200"), true)
    }

    func testTheListenerAndConnectionsAreCloseOnExec() throws {
        let s = try start(.standard)
        let c = try TCPClient(port: s.port)
        c.send(get)
        XCTAssertNotNil(c.receiveResponse())
        // The server's sockets (the listener, and the connection it accepted:
        // both have the server's port as their local port) are close-on-exec.
        var checked = 0
        for fd in ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap({ Int32($0) }) {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let port: Int? = withUnsafeMutablePointer(to: &storage) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                    guard getsockname(fd, sa, &length) == 0, sa.pointee.sa_family == sa_family_t(AF_INET) else { return nil }
                    return sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
                }
            }
            guard port == s.port else { continue }
            checked += 1
            XCTAssertNotEqual(fcntl(fd, F_GETFD) & FD_CLOEXEC, 0, "socket descriptor \(fd) of the server is not close-on-exec")
        }
        XCTAssertEqual(checked, 2, "the listener and one accepted connection")
    }
}
