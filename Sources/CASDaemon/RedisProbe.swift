import Foundation

/// Asks a Redis server on a unix socket how it is: one PING and, when it
/// answers that it is loading its data, one INFO persistence, over a
/// connection of its own (not a pool, which takes a LOADING reply for a
/// failure: retried and logged each time, while a server that loads a large
/// append-only file is asked every 100 ms for as long as it loads).
enum RedisProbe {
    static func ask(socketPath: String, timeout: Double) -> PrivateRedis.Answer {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let path = Array(socketPath.utf8)
        let room = MemoryLayout.size(ofValue: addr.sun_path)
        guard path.count < room else { return .none }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: path)
            raw[path.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .none }
        defer { close(fd) }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - Double(Int(timeout))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let connected = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { return .none }
        var reader = Reader(fd: fd)
        guard send(fd, "*1\r\n$4\r\nPING\r\n"), let line = reader.line() else { return .none }
        if line == "+PONG" { return .serving }
        guard line.hasPrefix("-LOADING") else { return .none }
        guard send(fd, "*2\r\n$4\r\nINFO\r\n$11\r\npersistence\r\n"), let head = reader.line(), head.hasPrefix("$"),
              let length = Int(head.dropFirst()), (0...65536).contains(length),
              let body = reader.bytes(length + 2) else {
            return .loading(percent: nil, etaSeconds: nil)
        }
        return PrivateRedis.loadingProgress(String(decoding: body.prefix(length), as: UTF8.self))
    }

    private static func send(_ fd: Int32, _ text: String) -> Bool {
        let bytes = Array(text.utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            sent += n
        }
        return true
    }

    /// Replies read from the socket, at most 64 KiB + a line in all.
    private struct Reader {
        let fd: Int32
        var buffer: [UInt8] = []

        init(fd: Int32) { self.fd = fd }

        /// The next line without its CRLF; nil on a timeout, an end or a line over 1 KiB.
        mutating func line() -> String? {
            while true {
                if let cr = buffer.firstIndex(of: 0x0d), cr + 1 < buffer.count, buffer[cr + 1] == 0x0a {
                    let line = String(decoding: buffer[..<cr], as: UTF8.self)
                    buffer.removeFirst(cr + 2)
                    return line
                }
                guard buffer.count <= 1024, fill() else { return nil }
            }
        }

        /// The next `count` bytes; nil on a timeout or an end.
        mutating func bytes(_ count: Int) -> [UInt8]? {
            while buffer.count < count {
                guard fill() else { return nil }
            }
            let out = Array(buffer[..<count])
            buffer.removeFirst(count)
            return out
        }

        private mutating func fill() -> Bool {
            var chunk = [UInt8](repeating: 0, count: 16384)
            while true {
                let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return false }
                buffer += chunk[..<n]
                return true
            }
        }
    }
}
