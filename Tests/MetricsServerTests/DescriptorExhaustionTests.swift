import CASCore
import Foundation
import MetricsServer
import TestSupport
import XCTest

/// The server when this process has no descriptor left: in this test
/// process, with its soft limit of open descriptors lowered and every
/// descriptor below it taken (restored at the end).
final class DescriptorExhaustionTests: XCTestCase {
    /// Started with no descriptor to keep as a spare, then asked to accept
    /// with none free: the listener rests between tries (a bounded number of
    /// rests, not a loop spinning on a listener that stays readable); once a
    /// descriptor is free the spare is taken again and the waiting
    /// connection is taken off the queue and closed; with descriptors back,
    /// connections are served.
    func testOutOfDescriptorsWithoutASpareTheListenerRestsAndTheSpareComesBack() throws {
        var saved = rlimit()
        XCTAssertEqual(getrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved), 0)
        let highest = try XCTUnwrap(openDescriptors().max())
        var fillers: [Int32] = []
        var lowered = false
        func restore() {
            for fd in fillers { close(fd) }
            fillers = []
            if lowered { _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved) }
            lowered = false
        }
        defer { restore() }

        // The client's socket, made while descriptors are there (connected later).
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        XCTAssertGreaterThanOrEqual(client, 0)
        defer { close(client) }
        var tv = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))

        var limit = saved
        limit.rlim_cur = rlim_t(highest + 64)
        XCTAssertLessThanOrEqual(limit.rlim_cur, saved.rlim_max)
        XCTAssertEqual(setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit), 0)
        lowered = true
        while true {
            let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
            if fd < 0 {
                XCTAssertEqual(errno, EMFILE)
                break
            }
            fillers.append(fd)
        }
        XCTAssertGreaterThan(fillers.count, 3)
        // Room for the listener and the wake-up pipe, none for the spare.
        for _ in 0..<3 { close(fillers.removeLast()) }
        let server = try MetricsServer.start(ListenAddress(host: "127.0.0.1", port: 0)) { "casfs_test 1\n" }
        defer { server.stop() }
        XCTAssertEqual(open("/dev/null", O_RDONLY | O_CLOEXEC), -1, "no descriptor left")

        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(server.port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        XCTAssertEqual(rc, 0, "connect: \(String(cString: strerror(errno)))")
        let get = Array("GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".utf8)
        XCTAssertEqual(get.withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }, get.count)

        XCTAssertTrue(pollUntil(60) { server.statistics.acceptPauses >= 2 }, "the server never found itself without descriptors")
        // Each rest lasts a tenth of a second: over a while, no more rests than that allows.
        let before = server.statistics.acceptPauses
        let start = monotonicNow()
        usleep(1_000_000)
        let after = server.statistics.acceptPauses
        let elapsed = monotonicNow() - start
        XCTAssertLessThanOrEqual(after - before, Int(elapsed / 0.1) + 2, "the loop does not rest between tries")
        XCTAssertEqual(server.statistics.accepted, 0)
        XCTAssertEqual(server.statistics.refused, 0)

        // One descriptor free: the server takes its spare back before it
        // accepts again, and refuses the waiting connection with it (or, had
        // the descriptor come free between the two, serves it).
        close(fillers.removeLast())
        XCTAssertTrue(pollUntil(60) { server.statistics.refused + server.statistics.accepted == 1 },
                      "the waiting connection was not taken off the queue: \(server.statistics)")
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = recv(client, &buffer, buffer.count, 0)
        if server.statistics.refused == 1 {
            // Closed with the request unread: a reset rather than an end of file.
            XCTAssertTrue(n == 0 || (n < 0 && errno == ECONNRESET), "the refused connection is closed: \(n)")
        } else {
            XCTAssertTrue(n > 0 && String(decoding: buffer[0..<n], as: UTF8.self).hasPrefix("HTTP/1.1 200"), "\(n)")
        }

        restore()
        let next = try TCPClient(port: server.port)
        next.send("GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        let reply = next.receiveResponse()
        XCTAssertEqual(reply?.head.hasPrefix("HTTP/1.1 200"), true)
    }

    func openDescriptors() -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int32($0) }
    }

    func monotonicNow() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
