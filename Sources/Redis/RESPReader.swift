/// An incremental reader of RESP2 replies (`+status`, `-error`, `:integer`,
/// `$bulk`, `*array`, and the nil bulk / nil array `$-1` / `*-1`).
///
/// Bytes are appended as they arrive, in pieces of any size; `next()` returns
/// each complete reply in order, or nil until enough bytes are there. The state
/// of a partly received array is kept between calls, so no byte is parsed twice
/// however the input is split. Malformed input throws `RedisError.io`; the
/// caller must then drop the connection.
public final class RESPReader {
    /// Deepest array nesting accepted (Redis replies nest a few levels at most).
    public static let maxDepth = 64
    /// Longest bulk string accepted: Redis's own limit (proto-max-bulk-len) is 512 MiB by default.
    public static let maxBulkLength = 1 << 32
    /// Longest status, error or integer line accepted.
    public static let maxLineLength = 1 << 20

    private var storage: UnsafeMutablePointer<UInt8>
    private var capacity: Int
    /// Bytes in `storage[start..<end]` are received and not yet consumed.
    private var start = 0
    private var end = 0
    /// Arrays being filled: elements still expected, and those received.
    private var stack: [(remaining: Int, items: [RedisReply])] = []

    public init(capacity: Int = 64 * 1024) {
        self.capacity = max(capacity, 16)
        self.storage = .allocate(capacity: self.capacity)
    }

    deinit { storage.deallocate() }

    /// Bytes received and not yet returned as (part of) a reply.
    public var buffered: Int { end - start }

    /// True when nothing is buffered and no array is half received.
    public var isIdle: Bool { start == end && stack.isEmpty }

    /// Appends received bytes.
    public func feed(_ bytes: UnsafeRawBufferPointer) {
        guard !bytes.isEmpty else { return }
        let space = writableSpace(minimum: bytes.count)
        space.copyMemory(from: bytes)
        didWrite(bytes.count)
    }

    public func feed(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { feed($0) }
    }

    /// Room for at least `minimum` more bytes at the end of the buffer, for a
    /// `read` straight into it; report what was written with `didWrite`.
    public func writableSpace(minimum: Int) -> UnsafeMutableRawBufferPointer {
        if capacity - end < minimum {
            let live = end - start
            if start > 0 && capacity - live >= minimum && live <= capacity / 2 {
                // Move the unread bytes to the front instead of growing.
                (storage).update(from: storage + start, count: live)
            } else {
                var newCapacity = capacity
                while newCapacity - live < minimum { newCapacity *= 2 }
                let grown = UnsafeMutablePointer<UInt8>.allocate(capacity: newCapacity)
                grown.update(from: storage + start, count: live)
                storage.deallocate()
                storage = grown
                capacity = newCapacity
            }
            start = 0
            end = live
        }
        return UnsafeMutableRawBufferPointer(start: storage + end, count: capacity - end)
    }

    public func didWrite(_ count: Int) {
        precondition(count >= 0 && end + count <= capacity)
        end += count
    }

    /// Drops everything buffered and any half-received reply.
    public func reset() {
        start = 0
        end = 0
        stack.removeAll()
    }

    /// The next complete reply, or nil if more bytes are needed.
    public func next() throws -> RedisReply? {
        while true {
            var value: RedisReply
            switch try element() {
            case nil:
                if start == end { start = 0; end = 0 }
                return nil
            case .value(let v):
                value = v
            case .arrayHeader(let n):
                guard stack.count < RESPReader.maxDepth else {
                    throw RedisError.io("protocol error: arrays nested deeper than \(RESPReader.maxDepth)")
                }
                var items: [RedisReply] = []
                items.reserveCapacity(min(n, 4096))
                stack.append((n, items))
                continue
            }
            // Hand the value to the innermost open array, closing arrays that are now complete.
            while !stack.isEmpty {
                let top = stack.count - 1
                stack[top].items.append(value)
                stack[top].remaining -= 1
                if stack[top].remaining > 0 { break }
                value = .array(stack.removeLast().items)
            }
            if stack.isEmpty { return value }
        }
    }

    private enum Element {
        case value(RedisReply)
        case arrayHeader(Int)
    }

    /// Parses one scalar or one array header at `start`; nil (consuming
    /// nothing) when it is not complete yet.
    private func element() throws -> Element? {
        guard start < end else { return nil }
        let type = storage[start]
        guard let lineEnd = try findCRLF(from: start + 1) else { return nil }
        let line = UnsafeBufferPointer(start: storage + start + 1, count: lineEnd - start - 1)
        switch type {
        case UInt8(ascii: ":"):
            let v = try RESPReader.integer(line)
            start = lineEnd + 2
            return .value(.integer(v))
        case UInt8(ascii: "+"):
            let s = String(decoding: line, as: UTF8.self)
            start = lineEnd + 2
            return .value(.status(s))
        case UInt8(ascii: "-"):
            let s = String(decoding: line, as: UTF8.self)
            start = lineEnd + 2
            return .value(.error(s))
        case UInt8(ascii: "$"):
            let n = try RESPReader.integer(line)
            if n == -1 {
                start = lineEnd + 2
                return .value(.null)
            }
            guard n >= 0, n <= RESPReader.maxBulkLength else {
                throw RedisError.io("protocol error: bad bulk length \(n)")
            }
            let body = lineEnd + 2
            let length = Int(n)
            guard end - body >= length + 2 else { return nil }
            guard storage[body + length] == 13, storage[body + length + 1] == 10 else {
                throw RedisError.io("protocol error: bulk string not terminated by CRLF")
            }
            let bytes = Array(UnsafeBufferPointer(start: storage + body, count: length))
            start = body + length + 2
            return .value(.bulk(bytes))
        case UInt8(ascii: "*"):
            let n = try RESPReader.integer(line)
            start = lineEnd + 2
            if n == -1 { return .value(.null) }
            guard n >= 0, n <= Int64(Int32.max) else { throw RedisError.io("protocol error: bad array length \(n)") }
            if n == 0 { return .value(.array([])) }
            return .arrayHeader(Int(n))
        default:
            throw RedisError.io("protocol error: unexpected reply type byte \(type)")
        }
    }

    /// Index of the CR of the first CRLF at or after `from`, or nil if none is buffered yet.
    private func findCRLF(from: Int) throws -> Int? {
        var i = from
        while i + 1 < end {
            if storage[i] == 13 {
                guard storage[i + 1] == 10 else { throw RedisError.io("protocol error: CR without LF") }
                return i
            }
            i += 1
        }
        if end - from > RESPReader.maxLineLength {
            throw RedisError.io("protocol error: line longer than \(RESPReader.maxLineLength) bytes")
        }
        return nil
    }

    /// A signed decimal, strictly: digits only, no overflow.
    static func integer(_ line: UnsafeBufferPointer<UInt8>) throws -> Int64 {
        var i = 0
        var negative = false
        if line.count > 0 && line[0] == UInt8(ascii: "-") {
            negative = true
            i = 1
        }
        guard i < line.count else { throw RedisError.io("protocol error: empty integer") }
        var v: Int64 = 0
        while i < line.count {
            let d = line[i] &- UInt8(ascii: "0")
            guard d < 10 else {
                throw RedisError.io("protocol error: bad integer '\(String(decoding: line.prefix(32), as: UTF8.self))'")
            }
            let (m, o1) = v.multipliedReportingOverflow(by: 10)
            let (s, o2) = negative ? m.subtractingReportingOverflow(Int64(d)) : m.addingReportingOverflow(Int64(d))
            guard !o1, !o2 else { throw RedisError.io("protocol error: integer out of range") }
            v = s
            i += 1
        }
        return v
    }
}
