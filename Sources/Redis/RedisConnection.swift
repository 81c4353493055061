import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One connection to Redis: a blocking socket with per-call timeouts, a RESP
/// writer (`RedisCommands`) and a RESP reader (`RESPReader`). Not thread-safe:
/// the pool hands it to one caller at a time, and only the pool keeps it
/// between calls. That exclusive hand-over is why it is `@unchecked Sendable`.
final class RedisConnection: @unchecked Sendable {
    private let fd: Int32
    private let reader = RESPReader()
    /// Set once an I/O or protocol error leaves the connection unusable.
    private(set) var broken = false

    /// Connects (TCP or unix socket) within `connectTimeout`, sets the command
    /// timeout on the socket, then sends AUTH and SELECT as configured.
    init(_ config: RedisConfig) throws {
        let endpoint = config.endpoint
        do {
            fd = try RedisConnection.connect(config)
        } catch let RedisError.io(m) {
            throw RedisError.connectionFailed("\(endpoint): \(m)")
        }
        var tv = timeval(seconds: config.commandTimeout)
        if tv.tv_sec == 0 && tv.tv_usec == 0 { tv.tv_usec = 1000 }  // 0 would mean "no timeout"
        if setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size)) != 0
            || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size)) != 0 {
            let m = RedisConnection.errnoText(errno)
            throw RedisError.connectionFailed("\(endpoint): cannot set the command timeout: \(m)")
        }
        // From here on a throw runs deinit, which closes the socket.
        do {
            if let password = config.password {
                try handshake(["AUTH", .string(password)], endpoint, what: "AUTH")
            }
            if config.db != 0 {
                try handshake(["SELECT", .integer(Int64(config.db))], endpoint, what: "SELECT \(config.db)")
            }
        } catch let RedisError.io(m) {
            throw RedisError.connectionFailed("\(endpoint): \(m)")
        }
    }

    private func handshake(_ args: [RedisArgument], _ endpoint: String, what: String) throws {
        let reply = try pipeline([args])[0]
        if case .error(let m) = reply {
            throw RedisError.connectionFailed("\(endpoint): \(what) refused: \(m)")
        }
    }

    deinit { close(fd) }

    /// True when the server has closed this idle connection (or sent data nobody asked for).
    var looksClosed: Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) != 0
    }

    /// Sends all commands in one write and reads one reply per command, in order.
    func pipeline(_ commands: [[RedisArgument]]) throws -> [RedisReply] {
        var batch = RedisCommands()
        for args in commands { batch.append(args) }
        return try pipeline(batch)
    }

    /// Sends the encoded batch and reads one reply per command, in order.
    /// Error replies are values; I/O errors, timeouts and protocol errors
    /// throw and mark the connection broken.
    func pipeline(_ batch: RedisCommands) throws -> [RedisReply] {
        guard !broken else { throw RedisError.io("connection already broken") }
        if batch.count == 0 { return [] }
        do {
            try batch.bytes.withUnsafeBytes { try writeAll($0) }
            var replies: [RedisReply] = []
            replies.reserveCapacity(batch.count)
            while replies.count < batch.count {
                if let r = try reader.next() {
                    replies.append(r)
                } else {
                    try receive()
                }
            }
            return replies
        } catch {
            broken = true
            reader.reset()
            throw error
        }
    }

    /// Bytes encoded before they are sent by `pipeline(count:encode:)`.
    static let streamChunkBytes = 64 * 1024
    private var scratch = RedisCommands()

    /// Streams `count` commands: `encode` appends command `i` to the batch it
    /// is given, and every ~64 KiB the batch is sent, so the server works on
    /// the first commands while the next are encoded; replies already
    /// available are parsed between sends. Returns one reply per command, in order.
    func pipeline(count: Int, encode: (inout RedisCommands, Int) -> Void) throws -> [RedisReply] {
        guard !broken else { throw RedisError.io("connection already broken") }
        if count == 0 { return [] }
        var replies: [RedisReply] = []
        replies.reserveCapacity(count)
        do {
            var i = 0
            while i < count {
                scratch.removeAll()
                while i < count && scratch.bytes.count < RedisConnection.streamChunkBytes {
                    let before = scratch.count
                    encode(&scratch, i)
                    precondition(scratch.count == before + 1, "encode must append exactly one command")
                    i += 1
                }
                try scratch.bytes.withUnsafeBytes { try writeAll($0) }
                if i < count { try parseAvailable(into: &replies, upTo: count) }
            }
            if scratch.bytes.capacity > 4 * RedisConnection.streamChunkBytes { scratch = RedisCommands() }
            while replies.count < count {
                if let r = try reader.next() {
                    replies.append(r)
                } else {
                    try receive()
                }
            }
            return replies
        } catch {
            broken = true
            reader.reset()
            throw error
        }
    }

    /// Parses the replies that have arrived, without waiting for more.
    private func parseAvailable(into replies: inout [RedisReply], upTo count: Int) throws {
        while true {
            while replies.count < count, let r = try reader.next() { replies.append(r) }
            if replies.count == count { return }
            let space = reader.writableSpace(minimum: 16 * 1024)
            let n = recv(fd, space.baseAddress, space.count, Int32(MSG_DONTWAIT))
            if n > 0 {
                reader.didWrite(n)
                continue
            }
            if n == 0 { throw RedisError.io("connection closed by the server") }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { return }
            throw RedisConnection.ioError(errno, "read")
        }
    }

    private func writeAll(_ bytes: UnsafeRawBufferPointer) throws {
        var sent = 0
        while sent < bytes.count {
            let n = send(fd, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
            if n > 0 {
                sent += n
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                throw RedisConnection.ioError(n == 0 ? EPIPE : errno, "write")
            }
        }
    }

    /// One read into the reader's buffer; throws on timeout, error or end of stream.
    private func receive() throws {
        while true {
            let space = reader.writableSpace(minimum: 16 * 1024)
            let n = recv(fd, space.baseAddress, space.count, 0)
            if n > 0 {
                reader.didWrite(n)
                return
            }
            if n == 0 { throw RedisError.io("connection closed by the server") }
            if errno == EINTR { continue }
            throw RedisConnection.ioError(errno, "read")
        }
    }

    private static func ioError(_ code: Int32, _ what: String) -> RedisError {
        if code == EAGAIN || code == EWOULDBLOCK {
            return .io("timed out (\(what))")
        }
        return .io("\(what) failed: \(errnoText(code))")
    }

    private static func errnoText(_ code: Int32) -> String {
        String(cString: strerror(code))
    }

    // MARK: - Connecting

    private static func connect(_ config: RedisConfig) throws -> Int32 {
        if let path = config.unixSocket {
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            let room = MemoryLayout.size(ofValue: addr.sun_path)
            guard bytes.count < room else { throw RedisError.io("unix socket path longer than \(room - 1) bytes") }
            withUnsafeMutableBytes(of: &addr.sun_path) { raw in
                raw.copyBytes(from: bytes)
                raw[bytes.count] = 0
            }
            return try withUnsafePointer(to: &addr) { p in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    try connect(family: AF_UNIX, $0, socklen_t(MemoryLayout<sockaddr_un>.size), timeout: config.connectTimeout)
                }
            }
        }
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(config.host, String(config.port), &hints, &list)
        guard rc == 0, let first = list else {
            throw RedisError.io("cannot resolve \(config.host): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(first) }
        var lastError = RedisError.io("no address for \(config.host)")
        var ai: UnsafeMutablePointer<addrinfo>? = first
        while let a = ai {
            do {
                let fd = try connect(family: a.pointee.ai_family, a.pointee.ai_addr, a.pointee.ai_addrlen, timeout: config.connectTimeout)
                var one: Int32 = 1
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                _ = setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
                return fd
            } catch let e as RedisError {
                lastError = e
            }
            ai = a.pointee.ai_next
        }
        throw lastError
    }

    /// A connected blocking socket, or an error after `timeout` seconds.
    private static func connect(family: Int32, _ addr: UnsafePointer<sockaddr>, _ len: socklen_t, timeout: Double) throws -> Int32 {
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw RedisError.io("socket: \(errnoText(errno))") }
        do {
            let flags = fcntl(fd, F_GETFL)
            guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 else { throw RedisError.io("fcntl: \(errnoText(errno))") }
            if Glibc.connect(fd, addr, len) != 0 {
                guard errno == EINPROGRESS || errno == EAGAIN else { throw RedisError.io(errnoText(errno)) }
                let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(max(0, timeout) * 1e9)
                while true {
                    let now = DispatchTime.now().uptimeNanoseconds
                    guard now < deadline else { throw RedisError.io("connect timed out") }
                    var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                    let r = poll(&p, 1, Int32(min(Int(Int32.max), Int((deadline - now + 999_999) / 1_000_000))))
                    if r < 0 && errno == EINTR { continue }
                    guard r >= 0 else { throw RedisError.io("poll: \(errnoText(errno))") }
                    if r > 0 { break }
                }
                var err: Int32 = 0
                var errLen = socklen_t(MemoryLayout<Int32>.size)
                guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &errLen) == 0 else { throw RedisError.io(errnoText(errno)) }
                guard err == 0 else { throw RedisError.io(errnoText(err)) }
            }
            guard fcntl(fd, F_SETFL, flags) == 0 else { throw RedisError.io("fcntl: \(errnoText(errno))") }
            return fd
        } catch {
            close(fd)
            throw error
        }
    }
}

extension timeval {
    init(seconds: Double) {
        let s = max(0, seconds)
        let whole = s.rounded(.down)
        self.init(tv_sec: Int(whole), tv_usec: Int((s - whole) * 1_000_000))
    }
}
