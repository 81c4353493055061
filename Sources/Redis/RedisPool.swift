import Dispatch
import Foundation
import Logging
import Synchronization

private let log = Logger(label: "casfs.redis")

/// A bounded pool of Redis connections. Each call checks one connection out,
/// uses it alone, and returns it; a connection that broke is dropped. When a
/// connect fails, further attempts are held back with exponential back-off and
/// callers get an error at once instead of waiting on a dead server.
public final class RedisPool: Sendable {
    public let config: RedisConfig
    private let slots: DispatchSemaphore
    private let state: Mutex<State>

    private struct State {
        var idle: [RedisConnection] = []
        var open = 0
        var closed = false
        var backoff: Double = 0
        var retryAt: UInt64 = 0
        var lastError = ""
    }

    /// Connections are made lazily, on first use.
    public init(_ config: RedisConfig) {
        precondition(config.maxConnections > 0, "maxConnections must be positive")
        self.config = config
        self.slots = DispatchSemaphore(value: config.maxConnections)
        self.state = Mutex(State())
    }

    /// Closes idle connections; later calls fail.
    public func close() {
        let idle = state.withLock { s -> [RedisConnection] in
            s.closed = true
            let i = s.idle
            s.idle = []
            s.open -= i.count
            return i
        }
        _ = idle  // freed here, outside the lock
    }

    /// Connections open now (idle and checked out).
    public var openConnections: Int { state.withLock { $0.open } }

    /// Runs one command.
    public func command(_ args: [RedisArgument]) throws -> RedisReply {
        try pipeline([args])[0]
    }

    /// Runs one command given as strings.
    public func command(_ args: String...) throws -> RedisReply {
        try pipeline([args.map { .string($0) }])[0]
    }

    /// Sends all commands in one batch over one connection and returns one reply
    /// per command, in order. Error replies are returned, not thrown; a broken
    /// connection or timeout throws.
    public func pipeline(_ commands: [[RedisArgument]]) throws -> [RedisReply] {
        if commands.isEmpty { return [] }
        return try withConnection { try $0.pipeline(commands) }
    }

    /// Sends an encoded batch over one connection; one reply per command, in order.
    public func pipeline(_ batch: RedisCommands) throws -> [RedisReply] {
        if batch.count == 0 { return [] }
        return try withConnection { try $0.pipeline(batch) }
    }

    /// Streams `count` commands over one connection: `encode` appends command
    /// `i` (exactly one) to the batch it is given; commands are sent in chunks
    /// as they are encoded, so the server starts before the last is encoded.
    /// One reply per command, in order.
    public func pipeline(count: Int, encode: (inout RedisCommands, Int) -> Void) throws -> [RedisReply] {
        if count <= 0 { return [] }
        return try withConnection { try $0.pipeline(count: count, encode: encode) }
    }

    /// Sends PING; throws unless the answer is PONG.
    public func ping() throws {
        let r = try command("PING")
        guard r.string == "PONG" else { throw RedisError.unexpectedReply("PING answered \(r)") }
    }

    func withConnection<T>(_ body: (RedisConnection) throws -> T) throws -> T {
        let wait = config.connectTimeout + config.commandTimeout
        guard slots.wait(timeout: .now() + wait) == .success else {
            throw RedisError.unavailable("\(config.endpoint): no connection free after \(wait) s (\(config.maxConnections) in use)")
        }
        defer { slots.signal() }
        let conn = try checkOut()
        let result: T
        do {
            result = try body(conn)
        } catch {
            checkIn(conn)
            throw error
        }
        checkIn(conn)
        return result
    }

    private func checkOut() throws -> RedisConnection {
        enum Next { case use(RedisConnection), connect, fail(String) }
        while true {
            var stale: RedisConnection?
            let next = state.withLock { s -> Next in
                if s.closed { return .fail("pool closed") }
                if let c = s.idle.popLast() {
                    if c.looksClosed {
                        s.open -= 1
                        stale = c
                        return .connect
                    }
                    return .use(c)
                }
                let now = DispatchTime.now().uptimeNanoseconds
                if now < s.retryAt {
                    let ms = (s.retryAt - now) / 1_000_000
                    return .fail("\(s.lastError); next connect attempt in \(ms) ms")
                }
                s.open += 1
                return .connect
            }
            switch next {
            case .use(let c):
                return c
            case .fail(let m):
                throw RedisError.unavailable("\(config.endpoint): \(m)")
            case .connect:
                if stale != nil {
                    // The server closed an idle connection (restart, idle timeout): try the next one.
                    stale = nil
                    continue
                }
                do {
                    let c = try RedisConnection(config)
                    state.withLock { s in
                        if s.backoff > 0 { log.info("reconnected to redis at \(config.endpoint)") }
                        s.backoff = 0
                        s.retryAt = 0
                    }
                    return c
                } catch {
                    let text = String(describing: error)
                    let firstFailure = state.withLock { s -> Bool in
                        defer { s.lastError = text }
                        s.open -= 1
                        s.backoff = s.backoff == 0 ? config.minBackoff : min(config.maxBackoff, s.backoff * 2)
                        s.retryAt = DispatchTime.now().uptimeNanoseconds + UInt64(s.backoff * 1e9)
                        return s.backoff == config.minBackoff
                    }
                    if firstFailure {
                        log.warning("\(text)")
                    } else {
                        log.debug("\(text)")
                    }
                    throw error
                }
            }
        }
    }

    private func checkIn(_ conn: RedisConnection) {
        let drop = state.withLock { s -> Bool in
            if conn.broken || s.closed {
                s.open -= 1
                return true
            }
            s.idle.append(conn)
            return false
        }
        if drop { log.debug("dropping a broken redis connection to \(config.endpoint)") }
    }
}
