import Foundation

/// A plain TCP client on a blocking socket with timeouts, for tests that
/// behave as hostile HTTP clients do (pipelining without reading, sending
/// nothing, dripping bytes).
public final class TCPClient: @unchecked Sendable {
    public let fd: Int32
    /// Bytes received past the last response read.
    private var pending: [UInt8] = []

    /// Connects to 127.0.0.1:`port`; `timeout` bounds each send and receive.
    public init(port: Int, timeout: Double = 60) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket: \(String(cString: strerror(errno)))") }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - Double(Int(timeout))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw TestSupportError("connect 127.0.0.1:\(port): \(String(cString: strerror(e)))")
        }
    }

    deinit { close(fd) }

    /// Sends all of `bytes`; false if the connection failed (or a send timed out).
    @discardableResult
    public func send(_ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
            if n <= 0 {
                if n < 0 && errno == EINTR { continue }
                return false
            }
            sent += n
        }
        return true
    }

    @discardableResult
    public func send(_ text: String) -> Bool { send(Array(text.utf8)) }

    /// Reads until the server closes the connection (or a receive times
    /// out, or `limit` bytes came): what came, and whether it ended in a close.
    public func receiveUntilClosed(limit: Int = 1 << 24) -> (bytes: [UInt8], closed: Bool) {
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while out.count < limit {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 {
                out += buffer[0..<n]
                continue
            }
            if n < 0 && errno == EINTR { continue }
            // 0: closed; ECONNRESET: closed hard. EAGAIN: the receive timed out.
            return (out, n == 0 || errno == ECONNRESET)
        }
        return (out, false)
    }

    /// Waits, without reading, until the server has closed or reset the
    /// connection; false if `seconds` pass first.
    public func waitUntilClosedByPeer(seconds: Double) -> Bool {
        let end = Date().addingTimeInterval(seconds)
        let rdhup: Int16 = 0x2000  // POLLRDHUP (Linux; not exported to Swift)
        while Date() < end {
            var p = pollfd(fd: fd, events: rdhup, revents: 0)
            if poll(&p, 1, 200) > 0 && p.revents & (rdhup | Int16(POLLHUP | POLLERR)) != 0 { return true }
        }
        return false
    }

    /// Reads one HTTP/1.1 response (head and Content-Length body); nil if
    /// the connection ended or timed out first.
    public func receiveResponse() -> (head: String, body: [UInt8])? {
        var data = pending
        pending = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        func fill() -> Bool {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 { data += buffer[0..<n] }
            return n > 0
        }
        while true {
            if let end = data.indices.dropLast(3).first(where: { data[$0] == 13 && data[$0 + 1] == 10 && data[$0 + 2] == 13 && data[$0 + 3] == 10 }) {
                let head = String(decoding: data[0..<end], as: UTF8.self)
                let length = head.lowercased().split(separator: "\r\n").first { $0.hasPrefix("content-length:") }
                    .flatMap { Int($0.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces)) } ?? 0
                while data.count < end + 4 + length { if !fill() { return nil } }
                pending = Array(data[(end + 4 + length)...])
                return (head, Array(data[(end + 4)..<(end + 4 + length)]))
            }
            if !fill() { return nil }
        }
    }
}

/// The resident set of process `pid` in KiB (VmRSS), nil if unreadable.
public func residentKiB(_ pid: pid_t) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
    }
    return nil
}
