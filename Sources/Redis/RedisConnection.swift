import CHiredis
import Foundation

/// One hiredis context. Not thread-safe: the pool hands it to one caller at a
/// time, and only the pool keeps it between calls. That exclusive hand-over is
/// why it is `@unchecked Sendable`.
///
/// Commands are encoded by `RedisCommands` and handed to hiredis already
/// formatted (`redisAppendFormattedCommand` takes a buffer of several complete
/// commands); hiredis does the socket I/O and parses the replies, which are
/// converted to `RedisReply` and freed. Any error on the context (I/O, timeout,
/// end of stream, protocol) marks the connection broken; the pool then drops it.
final class RedisConnection: @unchecked Sendable {
    private let ctx: UnsafeMutablePointer<redisContext>
    /// Where this connection goes.
    let endpoint: RedisEndpoint
    /// Set once an I/O or protocol error leaves the context unusable.
    private(set) var broken = false
    /// Set when the context failed on a malformed reply (not worth a retry).
    private(set) var protocolFailure = false
    /// Seconds allowed for each socket read or write.
    private let commandTimeout: Double

    /// Connects to `endpoint` within `connectTimeout`, sets the command
    /// timeout on the socket, then, when `authenticate`, sends AUTH and SELECT
    /// as configured (a sentinel gets neither).
    init(_ endpoint: RedisEndpoint, _ config: RedisConfig, authenticate: Bool = true) throws {
        self.endpoint = endpoint
        let connectTV = timeval(seconds: config.connectTimeout)
        let made: UnsafeMutablePointer<redisContext>?
        switch endpoint {
        case .unix(let path):
            made = redisConnectUnixWithTimeout(path, connectTV)
        case .tcp(let a):
            guard (1...65535).contains(a.port) else { throw RedisError.connectionFailed("\(endpoint): not a port number") }
            made = redisConnectWithTimeout(a.host, Int32(a.port), connectTV)
        }
        guard let made else { throw RedisError.connectionFailed("\(endpoint): cannot allocate a hiredis context") }
        if made.pointee.err != 0 {
            let m = RedisConnection.errorText(made)
            redisFree(made)
            throw RedisError.connectionFailed("\(endpoint): \(m)")
        }
        ctx = made
        // From here on a throw runs deinit, which frees the context.
        let fd = ctx.pointee.fd
        let fdFlags = fcntl(fd, F_GETFD)
        if fdFlags >= 0 { _ = fcntl(fd, F_SETFD, fdFlags | FD_CLOEXEC) }
        commandTimeout = config.commandTimeout
        guard setTimeout(commandTimeout) else {
            throw RedisError.connectionFailed("\(endpoint): cannot set the command timeout: \(RedisConnection.errorText(ctx))")
        }
        if case .tcp = endpoint { _ = redisEnableKeepAlive(ctx) }
        guard authenticate else { return }
        if let password = config.password {
            try handshake([Array("AUTH".utf8), Array(password.utf8)], what: "AUTH")
        }
        if config.db != 0 {
            try handshake([Array("SELECT".utf8), Array(String(config.db).utf8)], what: "SELECT \(config.db)")
        }
    }

    /// Runs `body` with each socket read or write allowed `extra` more
    /// seconds (for a command that blocks on the server, such as WAIT).
    func withLongerTimeout<T>(by extra: Double, _ body: () throws -> T) throws -> T {
        guard extra > 0 else { return try body() }
        guard setTimeout(commandTimeout + extra) else { throw fail("cannot set the timeout") }
        defer { if !broken && !setTimeout(commandTimeout) { broken = true } }
        return try body()
    }

    private func setTimeout(_ seconds: Double) -> Bool {
        var tv = timeval(seconds: seconds)
        if tv.tv_sec == 0 && tv.tv_usec == 0 { tv.tv_usec = 1000 }  // 0 would mean "no timeout"
        return redisSetTimeout(ctx, tv) == REDIS_OK
    }

    /// The role the server reports (`ROLE`): "master", "slave" or "sentinel".
    func role() throws -> String {
        let r = try pipeline([["ROLE"]])[0]
        guard case .array(let parts) = r, let role = parts.first?.string else {
            throw RedisError.unexpectedReply("\(endpoint): ROLE answered \(r)")
        }
        return role
    }

    /// Replicas connected to this master, as `ROLE` lists them.
    func connectedReplicas() throws -> Int {
        let r = try pipeline([["ROLE"]])[0]
        guard case .array(let parts) = r, parts.count >= 3, parts[0].string == "master", case .array(let replicas) = parts[2] else {
            throw RedisError.unexpectedReply("\(endpoint): ROLE of a master answered \(r)")
        }
        return replicas.count
    }

    /// One command through `redisCommandArgv`; an error reply fails the connect.
    private func handshake(_ args: [[UInt8]], what: String) throws {
        let reply: RedisReply
        do {
            reply = try commandArgv(args)
        } catch let RedisError.io(m) {
            throw RedisError.connectionFailed("\(endpoint): \(what): \(m)")
        }
        if case .error(let m) = reply {
            throw RedisError.connectionFailed("\(endpoint): \(what) refused: \(m)")
        }
    }

    deinit { redisFree(ctx) }

    /// True when the server has closed this idle connection (or sent data nobody asked for).
    var looksClosed: Bool {
        var p = pollfd(fd: ctx.pointee.fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) != 0
    }

    /// Sends one command, binary-safe, with `redisCommandArgv` and waits for its reply.
    private func commandArgv(_ args: [[UInt8]]) throws -> RedisReply {
        guard !broken else { throw RedisError.io("connection already broken") }
        let lengths = args.map(\.count)
        var joined: [UInt8] = []
        joined.reserveCapacity(lengths.reduce(1, +))
        for a in args { joined += a }
        joined.append(0)  // never an empty buffer, so every pointer below is valid
        let raw: UnsafeMutableRawPointer? = RedisConnection.withoutSIGPIPE { joined.withUnsafeBufferPointer { buf in
            buf.withMemoryRebound(to: CChar.self) { chars in
                var pointers: [UnsafePointer<CChar>?] = []
                pointers.reserveCapacity(args.count)
                var offset = 0
                for n in lengths {
                    pointers.append(UnsafePointer(chars.baseAddress! + offset))
                    offset += n
                }
                return pointers.withUnsafeMutableBufferPointer { argv in
                    lengths.withUnsafeBufferPointer { argvlen in
                        redisCommandArgv(ctx, Int32(args.count), argv.baseAddress, argvlen.baseAddress)
                    }
                }
            }
        } }
        guard let raw else { throw fail() }
        defer { freeReplyObject(raw) }
        return RedisConnection.convert(raw.assumingMemoryBound(to: redisReply.self))
    }

    /// Sends all commands in one write and reads one reply per command, in order.
    func pipeline(_ commands: [[RedisArgument]]) throws -> [RedisReply] {
        var batch = RedisCommands()
        for args in commands { batch.append(args) }
        return try pipeline(batch)
    }

    /// Sends the encoded batch (one append to hiredis's output buffer, then
    /// written out) and reads one reply per command, in order.
    /// Error replies are values; I/O errors, timeouts and protocol errors
    /// throw and mark the connection broken.
    func pipeline(_ batch: RedisCommands) throws -> [RedisReply] {
        guard !broken else { throw RedisError.io("connection already broken") }
        if batch.count == 0 { return [] }
        try append(batch.bytes)
        try flush()
        var replies: [RedisReply] = []
        replies.reserveCapacity(batch.count)
        try receiveRest(into: &replies, upTo: batch.count)
        return replies
    }

    /// Bytes encoded before they are sent by `pipeline(count:encode:)`.
    static let streamChunkBytes = 64 * 1024
    private var scratch = RedisCommands()

    /// Streams `count` commands: `encode` appends command `i` to the batch it
    /// is given, and every ~64 KiB the batch is appended to the context and
    /// written out, so the server works on the first commands while the next
    /// are encoded; replies already received are parsed between chunks
    /// without waiting. Returns one reply per command, in order.
    func pipeline(count: Int, encode: (inout RedisCommands, Int) -> Void) throws -> [RedisReply] {
        guard !broken else { throw RedisError.io("connection already broken") }
        if count == 0 { return [] }
        var replies: [RedisReply] = []
        replies.reserveCapacity(count)
        var i = 0
        while i < count {
            scratch.removeAll()
            while i < count && scratch.bytes.count < RedisConnection.streamChunkBytes {
                let before = scratch.count
                encode(&scratch, i)
                precondition(scratch.count == before + 1, "encode must append exactly one command")
                i += 1
            }
            try append(scratch.bytes)
            try flush()
            if i < count { try receiveAvailable(into: &replies, upTo: count) }
        }
        if scratch.bytes.capacity > 4 * RedisConnection.streamChunkBytes { scratch = RedisCommands() }
        try receiveRest(into: &replies, upTo: count)
        return replies
    }

    // MARK: - hiredis calls

    /// Queues already-encoded commands in the context's output buffer.
    private func append(_ bytes: [UInt8]) throws {
        let rc = bytes.withUnsafeBufferPointer { buf in
            buf.withMemoryRebound(to: CChar.self) { redisAppendFormattedCommand(ctx, $0.baseAddress, $0.count) }
        }
        guard rc == REDIS_OK else { throw fail("cannot queue commands") }
    }

    /// Writes the whole output buffer (each write bounded by the command timeout).
    private func flush() throws {
        try RedisConnection.withoutSIGPIPE {
            var done: Int32 = 0
            repeat {
                guard redisBufferWrite(ctx, &done) == REDIS_OK else { throw fail() }
            } while done == 0
        }
    }

    /// Runs `body` with SIGPIPE blocked in this thread and discards a SIGPIPE it
    /// raised. hiredis writes with write(2), not send(MSG_NOSIGNAL): writing to
    /// a connection the server has closed would otherwise kill the process
    /// instead of failing with EPIPE. Nothing process-wide is changed.
    private static func withoutSIGPIPE<T>(_ body: () throws -> T) rethrows -> T {
        var pipeOnly = sigset_t()
        sigemptyset(&pipeOnly)
        sigaddset(&pipeOnly, SIGPIPE)
        var previous = sigset_t()
        pthread_sigmask(SIG_BLOCK, &pipeOnly, &previous)
        var pending = sigset_t()
        sigpending(&pending)
        let pendingBefore = sigismember(&pending, SIGPIPE) == 1
        defer {
            if !pendingBefore {
                sigpending(&pending)
                if sigismember(&pending, SIGPIPE) == 1 {
                    var now = timespec(tv_sec: 0, tv_nsec: 0)
                    _ = sigtimedwait(&pipeOnly, nil, &now)
                }
            }
            if sigismember(&previous, SIGPIPE) == 0 { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        }
        return try body()
    }

    /// Takes the replies that have arrived, reading only what the socket holds now.
    private func receiveAvailable(into replies: inout [RedisReply], upTo count: Int) throws {
        let fd = ctx.pointee.fd
        while replies.count < count {
            if let r = try replyFromReader() {
                replies.append(r)
                continue
            }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let n = poll(&p, 1, 0)
            if n == 0 { return }
            if n < 0 {
                if errno == EINTR { continue }
                broken = true
                throw RedisError.io("poll failed: \(String(cString: strerror(errno)))")
            }
            // Readable, hung up or in error: the read reports which.
            guard redisBufferRead(ctx) == REDIS_OK else { throw fail() }
        }
    }

    /// Waits for the remaining replies (each read bounded by the command timeout).
    private func receiveRest(into replies: inout [RedisReply], upTo count: Int) throws {
        while replies.count < count {
            var raw: UnsafeMutableRawPointer?
            guard redisGetReply(ctx, &raw) == REDIS_OK, let raw else { throw fail() }
            replies.append(RedisConnection.convert(raw.assumingMemoryBound(to: redisReply.self)))
            freeReplyObject(raw)
        }
    }

    /// A complete reply already in hiredis's read buffer, or nil.
    private func replyFromReader() throws -> RedisReply? {
        var raw: UnsafeMutableRawPointer?
        guard redisGetReplyFromReader(ctx, &raw) == REDIS_OK else { throw fail() }
        guard let raw else { return nil }
        defer { freeReplyObject(raw) }
        return RedisConnection.convert(raw.assumingMemoryBound(to: redisReply.self))
    }

    /// Marks the connection broken and describes the context's error.
    private func fail(_ what: String? = nil) -> RedisError {
        broken = true
        if ctx.pointee.err == REDIS_ERR_PROTOCOL { protocolFailure = true }
        let text = RedisConnection.errorText(ctx)
        return .io(what.map { "\($0): \(text)" } ?? text)
    }

    private static func errorText(_ ctx: UnsafeMutablePointer<redisContext>) -> String {
        let code = ctx.pointee.err
        let text = withUnsafeBytes(of: ctx.pointee.errstr) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        switch code {
        case 0:
            return "no reply"
        case REDIS_ERR_IO where text.contains("temporarily unavailable") || text.contains("timed out"):
            return "timed out (\(text))"
        case REDIS_ERR_EOF:
            return "connection closed by the server"
        case REDIS_ERR_PROTOCOL:
            let detail = text.hasPrefix("Protocol error, ") ? String(text.dropFirst("Protocol error, ".count)) : text
            return "protocol error: \(detail)"
        default:
            return text.isEmpty ? "error \(code)" : text
        }
    }

    // MARK: - Replies

    private static func convert(_ r: UnsafeMutablePointer<redisReply>) -> RedisReply {
        let reply = r.pointee
        switch reply.type {
        case REDIS_REPLY_INTEGER:
            return .integer(Int64(reply.integer))
        case REDIS_REPLY_STRING:
            guard reply.len > 0, let s = reply.str else { return .bulk([]) }
            return .bulk(Array(UnsafeRawBufferPointer(start: s, count: Int(reply.len))))
        case REDIS_REPLY_STATUS:
            return .status(text(reply))
        case REDIS_REPLY_ERROR:
            return .error(text(reply))
        case REDIS_REPLY_ARRAY:
            var items: [RedisReply] = []
            items.reserveCapacity(Int(reply.elements))
            for i in 0..<Int(reply.elements) {
                if let e = reply.element[i] { items.append(convert(e)) } else { items.append(.null) }
            }
            return .array(items)
        default:
            return .null
        }
    }

    private static func text(_ reply: redisReply) -> String {
        guard reply.len > 0, let s = reply.str else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: s, count: Int(reply.len)), as: UTF8.self)
    }
}

extension timeval {
    init(seconds: Double) {
        let s = max(0, seconds)
        let whole = s.rounded(.down)
        self.init(tv_sec: Int(whole), tv_usec: Int((s - whole) * 1_000_000))
    }
}
