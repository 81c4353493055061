import CHiredis
import Foundation

/// One hiredis context. Not thread-safe: the pool hands it to one caller at a
/// time, and only the pool keeps it between calls. That exclusive hand-over is
/// why it is marked `@unchecked Sendable`.
final class RedisConnection: @unchecked Sendable {
    private let ctx: UnsafeMutablePointer<redisContext>
    /// Set once an I/O or protocol error leaves the context unusable.
    private(set) var broken = false

    /// Connects, sets the command timeout, then AUTH and SELECT as configured.
    init(_ config: RedisConfig) throws {
        let ctx: UnsafeMutablePointer<redisContext>?
        let connectTV = timeval(seconds: config.connectTimeout)
        if let path = config.unixSocket {
            ctx = redisConnectUnixWithTimeout(path, connectTV)
        } else {
            ctx = redisConnectWithTimeout(config.host, Int32(config.port), connectTV)
        }
        guard let ctx else { throw RedisError.connectionFailed("\(config.endpoint): cannot allocate a context") }
        if ctx.pointee.err != 0 {
            let msg = RedisConnection.errorString(ctx)
            redisFree(ctx)
            throw RedisError.connectionFailed("\(config.endpoint): \(msg)")
        }
        self.ctx = ctx
        if redisSetTimeout(ctx, timeval(seconds: config.commandTimeout)) != REDIS_OK {
            throw RedisError.connectionFailed("\(config.endpoint): cannot set the command timeout")
        }
        if config.unixSocket == nil { _ = redisEnableKeepAlive(ctx) }
        do {
            if let password = config.password {
                try handshake(["AUTH", .string(password)], config, what: "AUTH")
            }
            if config.db != 0 {
                try handshake(["SELECT", .integer(Int64(config.db))], config, what: "SELECT \(config.db)")
            }
        } catch let RedisError.io(m) {
            throw RedisError.connectionFailed("\(config.endpoint): \(m)")
        }
    }

    private func handshake(_ args: [RedisArgument], _ config: RedisConfig, what: String) throws {
        let reply = try pipeline([args])[0]
        if case .error(let m) = reply {
            throw RedisError.connectionFailed("\(config.endpoint): \(what) refused: \(m)")
        }
    }

    deinit { redisFree(ctx) }

    /// True when the server has closed this idle connection (or sent data nobody asked for).
    var looksClosed: Bool {
        var p = pollfd(fd: ctx.pointee.fd, events: Int16(POLLIN), revents: 0)
        let r = poll(&p, 1, 0)
        return r != 0
    }

    /// Sends all commands in one write and reads one reply per command, in order.
    func pipeline(_ commands: [[RedisArgument]]) throws -> [RedisReply] {
        var batch = RedisCommands()
        for args in commands { batch.append(args) }
        return try pipeline(batch)
    }

    /// Sends the encoded batch (one append to the output buffer, flushed by the
    /// first read) and reads one reply per command, in order.
    func pipeline(_ batch: RedisCommands) throws -> [RedisReply] {
        guard !broken else { throw RedisError.io("connection already broken") }
        if batch.count == 0 { return [] }
        let rc = batch.bytes.withUnsafeBufferPointer { buf in
            buf.withMemoryRebound(to: CChar.self) { redisAppendFormattedCommand(ctx, $0.baseAddress, $0.count) }
        }
        if rc != REDIS_OK {
            broken = true
            throw RedisError.io("cannot queue commands: \(RedisConnection.errorString(ctx))")
        }
        var replies: [RedisReply] = []
        replies.reserveCapacity(batch.count)
        for _ in 0..<batch.count {
            var raw: UnsafeMutableRawPointer?
            if redisGetReply(ctx, &raw) != REDIS_OK || raw == nil {
                broken = true
                throw RedisError.io(RedisConnection.errorString(ctx))
            }
            replies.append(RedisConnection.convert(raw!.assumingMemoryBound(to: redisReply.self)))
            freeReplyObject(raw)
        }
        return replies
    }

    private static func errorString(_ ctx: UnsafeMutablePointer<redisContext>) -> String {
        let code = ctx.pointee.err
        var text = withUnsafeBytes(of: ctx.pointee.errstr) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if code == REDIS_ERR_IO && (text.contains("temporarily unavailable") || text.contains("timed out")) {
            text = "timed out (\(text))"
        }
        return text.isEmpty ? "error \(code)" : text
    }

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
