/// A batch of commands encoded in the Redis protocol (RESP) into one buffer,
/// ready to be sent in a single write. Building it does one allocation per
/// buffer growth, not per command or argument.
public struct RedisCommands: Sendable {
    /// The encoded commands.
    public private(set) var bytes: [UInt8] = []
    /// Number of complete commands.
    public private(set) var count = 0
    private var pendingArguments = 0

    public init(reservingBytes: Int = 0) {
        bytes.reserveCapacity(reservingBytes)
    }

    /// Empties the batch, keeping its buffer for reuse.
    public mutating func removeAll() {
        precondition(pendingArguments == 0, "a command is incomplete")
        bytes.removeAll(keepingCapacity: true)
        count = 0
    }

    /// Appends one command that `build` writes, already RESP-encoded, at the
    /// end of `bytes` (for hot paths that precompute the constant parts).
    public mutating func appendCommand(encodedBy build: (inout [UInt8]) -> Void) {
        precondition(pendingArguments == 0, "a command is incomplete")
        build(&bytes)
        count += 1
    }

    /// Appends one command.
    public mutating func append(_ args: [RedisArgument]) {
        begin(argumentCount: args.count)
        for a in args {
            switch a {
            case .string(let s):
                var s = s
                s.withUTF8 { argument($0) }
            case .bytes(let b): b.withUnsafeBufferPointer { argument($0) }
            case .integer(let i): argument(i)
            }
        }
    }

    /// Starts a command of `argumentCount` arguments; follow with exactly that many `argument` calls.
    public mutating func begin(argumentCount: Int) {
        precondition(pendingArguments == 0, "previous command is incomplete")
        precondition(argumentCount > 0, "a command has at least one argument")
        bytes.append(UInt8(ascii: "*"))
        appendDecimal(Int64(argumentCount))
        bytes.append(13); bytes.append(10)
        pendingArguments = argumentCount
    }

    /// One binary-safe argument.
    public mutating func argument(_ b: UnsafeBufferPointer<UInt8>) {
        argument(length: b.count) { p in
            if let base = b.baseAddress { p.update(from: base, count: b.count) }
        }
    }

    public mutating func argument(_ s: StaticString) {
        argument(UnsafeBufferPointer(start: s.utf8Start, count: s.utf8CodeUnitCount))
    }

    /// An integer argument, in decimal.
    public mutating func argument(_ i: Int64) {
        let n = RedisCommands.decimalLength(i)
        argument(length: n) { RedisCommands.writeDecimal(i, to: $0, length: n) }
    }

    /// An argument of exactly `length` bytes; `write` must fill all of them at the pointer it gets.
    public mutating func argument(length: Int, _ write: (UnsafeMutablePointer<UInt8>) -> Void) {
        precondition(pendingArguments > 0, "more arguments than announced")
        bytes.append(UInt8(ascii: "$"))
        appendDecimal(Int64(length))
        bytes.append(13); bytes.append(10)
        let start = bytes.count
        bytes.append(contentsOf: repeatElement(0, count: length + 2))
        bytes.withUnsafeMutableBufferPointer { buf in
            let p = buf.baseAddress! + start
            write(p)
            p[length] = 13
            p[length + 1] = 10
        }
        pendingArguments -= 1
        if pendingArguments == 0 { count += 1 }
    }

    /// Writes the `length` decimal digits of `value` (see `decimalLength`) at `p`.
    public static func writeDecimal(_ value: Int64, to p: UnsafeMutablePointer<UInt8>, length: Int) {
        var v = value.magnitude
        var i = length
        repeat {
            i -= 1
            p[i] = UInt8(ascii: "0") + UInt8(v % 10)
            v /= 10
        } while v > 0
        if value < 0 { p[0] = UInt8(ascii: "-") }
    }

    /// Appends the decimal digits of `value` (used for integer arguments and sizes in keys).
    public mutating func appendDecimal(_ value: Int64) {
        RedisCommands.appendDecimal(value, to: &bytes)
    }

    public static func appendDecimal(_ value: Int64, to bytes: inout [UInt8]) {
        if value < 0 { bytes.append(UInt8(ascii: "-")) }
        var v = value.magnitude
        if v < 10 { bytes.append(UInt8(ascii: "0") + UInt8(v)); return }
        var tmp: (UInt64, UInt64, UInt64) = (0, 0, 0)  // 24 bytes of scratch, enough for 20 digits
        withUnsafeMutableBytes(of: &tmp) { buf in
            var i = buf.count
            while v > 0 {
                i -= 1
                buf[i] = UInt8(ascii: "0") + UInt8(v % 10)
                v /= 10
            }
            bytes.append(contentsOf: buf[i...])
        }
    }

    /// Number of bytes `appendDecimal` writes for `value`.
    public static func decimalLength(_ value: Int64) -> Int {
        var n = value < 0 ? 2 : 1
        var v = value.magnitude
        while v >= 10 { v /= 10; n += 1 }
        return n
    }
}
