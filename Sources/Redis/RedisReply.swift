import Foundation

/// One argument of a Redis command. Strings are sent as their UTF-8 bytes,
/// integers in decimal; byte arrays are sent as they are (binary-safe).
public enum RedisArgument: Sendable, Hashable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral {
    case string(String)
    case bytes([UInt8])
    case integer(Int64)

    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .integer(value) }
    public init(_ data: Data) { self = .bytes(Array(data)) }
}

/// A reply from Redis. Error replies are values, not thrown: in a pipeline one
/// command may fail while the others succeed. Use `checked()` to throw them.
public enum RedisReply: Sendable, Equatable, CustomStringConvertible {
    case status(String)
    case error(String)
    case integer(Int64)
    /// A bulk string, binary-safe.
    case bulk([UInt8])
    case array([RedisReply])
    /// A nil bulk string or nil array.
    case null

    /// The text of a status or bulk reply.
    public var string: String? {
        switch self {
        case .status(let s): return s
        case .bulk(let b): return String(decoding: b, as: UTF8.self)
        default: return nil
        }
    }

    /// The bytes of a bulk reply.
    public var bytes: [UInt8]? {
        if case .bulk(let b) = self { return b }
        return nil
    }

    public var isError: Bool {
        if case .error = self { return true }
        return false
    }

    public var isNull: Bool {
        if case .null = self { return true }
        return false
    }

    /// Throws `RedisError.server` for an error reply, else returns self.
    @discardableResult
    public func checked() throws -> RedisReply {
        if case .error(let m) = self { throw RedisError.server(m) }
        return self
    }

    /// The integer of an integer reply, or of a bulk string holding a decimal
    /// number (GET of a counter). Throws for errors and other shapes.
    public func integerValue() throws -> Int64 {
        switch self {
        case .integer(let i): return i
        case .bulk(let b):
            if let i = Int64(String(decoding: b, as: UTF8.self)) { return i }
            throw RedisError.unexpectedReply("expected an integer, got bulk '\(String(decoding: b.prefix(40), as: UTF8.self))'")
        case .error(let m): throw RedisError.server(m)
        default: throw RedisError.unexpectedReply("expected an integer, got \(self)")
        }
    }

    public var description: String {
        switch self {
        case .status(let s): return "status(\(s))"
        case .error(let s): return "error(\(s))"
        case .integer(let i): return "integer(\(i))"
        case .bulk(let b): return "bulk(\(b.count) bytes)"
        case .array(let a): return "array(\(a.count))"
        case .null: return "null"
        }
    }
}

/// Failures of the Redis client.
public enum RedisError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Could not connect (refused, no such socket, timeout, AUTH or SELECT failed).
    case connectionFailed(String)
    /// The connection broke or timed out during a command.
    case io(String)
    /// Redis answered with an error reply.
    case server(String)
    /// Redis answered with a reply of an unexpected shape.
    case unexpectedReply(String)
    /// No connection became free in time, or the pool is closed.
    case unavailable(String)
    /// A durable pipeline ran on the master but too few replicas acknowledged it.
    case notDurable(String)

    public var description: String {
        switch self {
        case .connectionFailed(let m): return "redis connection failed: \(m)"
        case .io(let m): return "redis I/O error: \(m)"
        case .server(let m): return "redis error reply: \(m)"
        case .unexpectedReply(let m): return "unexpected redis reply: \(m)"
        case .unavailable(let m): return "redis unavailable: \(m)"
        case .notDurable(let m): return "redis write not acknowledged by enough replicas: \(m)"
        }
    }

    /// True when a command that failed this way may have run on the server,
    /// or may still run: anything but an error reply (the connection broke or
    /// timed out, possibly after the command was sent, on this try or an
    /// earlier one).
    public var outcomeUnknown: Bool {
        switch self {
        case .server, .notDurable: return false
        default: return true
        }
    }

    /// The same error with `note` added to its message.
    func adding(_ note: String) -> RedisError {
        switch self {
        case .connectionFailed(let m): return .connectionFailed("\(m) (\(note))")
        case .io(let m): return .io("\(m) (\(note))")
        case .server(let m): return .server("\(m) (\(note))")
        case .unexpectedReply(let m): return .unexpectedReply("\(m) (\(note))")
        case .unavailable(let m): return .unavailable("\(m) (\(note))")
        case .notDurable(let m): return .notDurable("\(m) (\(note))")
        }
    }
}
