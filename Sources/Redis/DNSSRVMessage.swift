/// One SRV record: where a service runs (RFC 2782).
public struct DNSSRVRecord: Sendable, Equatable {
    public var priority: UInt16
    public var weight: UInt16
    public var port: UInt16
    /// The target host name, without the trailing dot.
    public var target: String

    public init(priority: UInt16, weight: UInt16, port: UInt16, target: String) {
        self.priority = priority
        self.weight = weight
        self.port = port
        self.target = target
    }
}

/// DNS messages for an SRV lookup (RFC 1035 wire format): the query, and the
/// SRV records of an answer. Every length and offset read from an answer is
/// checked against the message before use.
public enum DNSSRVMessage {
    static let typeSRV: UInt16 = 33
    static let typeOPT: UInt16 = 41
    static let classIN: UInt16 = 1
    /// UDP payload size advertised with EDNS(0).
    static let udpPayload: UInt16 = 4096

    public struct Failure: Error, Sendable, Equatable, CustomStringConvertible {
        public let description: String
        init(_ description: String) { self.description = description }
    }

    /// A recursive query for the SRV records of `name`, with an EDNS(0) OPT record.
    public static func query(name: String, id: UInt16) throws -> [UInt8] {
        var b: [UInt8] = []
        append16(id, to: &b)
        append16(0x0100, to: &b)  // RD
        append16(1, to: &b)  // one question
        append16(0, to: &b)
        append16(0, to: &b)
        append16(1, to: &b)  // one additional: OPT
        try appendName(name, to: &b)
        append16(typeSRV, to: &b)
        append16(classIN, to: &b)
        b.append(0)  // root name
        append16(typeOPT, to: &b)
        append16(udpPayload, to: &b)
        b += [0, 0, 0, 0, 0, 0]  // extended rcode, version, flags; no options
        return b
    }

    /// The SRV records of the answer section, in the order received. Records
    /// whose target is the root (`.`: "no such service here") are left out.
    public static func records(in message: [UInt8], id: UInt16) throws -> [DNSSRVRecord] {
        guard message.count >= 12 else { throw Failure("DNS answer too short (\(message.count) bytes)") }
        guard read16(message, 0) == id else { throw Failure("DNS answer with another id") }
        let flags = read16(message, 2)
        guard flags & 0x8000 != 0 else { throw Failure("DNS message is not an answer") }
        if flags & 0x0200 != 0 { throw Failure("DNS answer truncated") }
        switch flags & 0x000F {
        case 0: break
        case 3: throw Failure("no such DNS name")
        case let rcode: throw Failure("DNS server answered with error code \(rcode)")
        }
        let questions = Int(read16(message, 4))
        let answers = Int(read16(message, 6))
        var offset = 12
        for _ in 0..<questions {
            offset = try skipName(message, offset)
            offset = try advance(message, offset, by: 4)
        }
        var out: [DNSSRVRecord] = []
        for _ in 0..<answers {
            offset = try skipName(message, offset)
            let fixedEnd = try advance(message, offset, by: 10)
            let type = read16(message, offset)
            let klass = read16(message, offset + 2)
            let length = Int(read16(message, offset + 8))
            let dataEnd = try advance(message, fixedEnd, by: length)
            if type == typeSRV && klass == classIN {
                guard length >= 7 else { throw Failure("SRV record too short") }
                let (target, targetEnd) = try readName(message, fixedEnd + 6)
                guard targetEnd <= dataEnd else { throw Failure("SRV target runs past its record") }
                if !target.isEmpty {
                    out.append(DNSSRVRecord(
                        priority: read16(message, fixedEnd), weight: read16(message, fixedEnd + 2),
                        port: read16(message, fixedEnd + 4), target: target))
                }
            }
            offset = dataEnd
        }
        return out
    }

    // MARK: - Names

    static func appendName(_ name: String, to b: inout [UInt8]) throws {
        var text = Substring(name)
        if text.hasSuffix(".") { text = text.dropLast() }
        guard !text.isEmpty else { throw Failure("empty DNS name") }
        var total = 1
        for label in text.split(separator: ".", omittingEmptySubsequences: false) {
            let bytes = Array(label.utf8)
            guard (1...63).contains(bytes.count) else { throw Failure("DNS name '\(name)' has an empty or too long label") }
            total += bytes.count + 1
            guard total <= 255 else { throw Failure("DNS name '\(name)' is too long") }
            b.append(UInt8(bytes.count))
            b += bytes
        }
        b.append(0)
    }

    /// Reads a possibly compressed name at `start`; returns it (no trailing
    /// dot; empty for the root) and the offset after it where it starts.
    static func readName(_ m: [UInt8], _ start: Int) throws -> (String, Int) {
        var labels: [String] = []
        var offset = start
        var end: Int?
        var jumps = 0
        var length = 1
        while true {
            guard offset < m.count else { throw Failure("DNS name runs past the message") }
            let n = Int(m[offset])
            switch n & 0xC0 {
            case 0:
                if n == 0 {
                    return (labels.joined(separator: "."), end ?? offset + 1)
                }
                let labelEnd = try advance(m, offset + 1, by: n)
                length += n + 1
                guard length <= 255 else { throw Failure("DNS name too long") }
                labels.append(String(decoding: m[(offset + 1)..<labelEnd], as: UTF8.self))
                offset = labelEnd
            case 0xC0:
                guard offset + 1 < m.count else { throw Failure("DNS name pointer runs past the message") }
                jumps += 1
                guard jumps <= 64 else { throw Failure("DNS name pointers loop") }
                if end == nil { end = offset + 2 }
                offset = (n & 0x3F) << 8 | Int(m[offset + 1])
            default:
                throw Failure("unknown DNS label type")
            }
        }
    }

    static func skipName(_ m: [UInt8], _ start: Int) throws -> Int {
        try readName(m, start).1
    }

    // MARK: - Integers

    static func advance(_ m: [UInt8], _ offset: Int, by n: Int) throws -> Int {
        guard n >= 0, offset <= m.count, n <= m.count - offset else { throw Failure("DNS answer truncated inside a record") }
        return offset + n
    }

    static func read16(_ m: [UInt8], _ offset: Int) -> UInt16 {
        UInt16(m[offset]) << 8 | UInt16(m[offset + 1])
    }

    static func append16(_ v: UInt16, to b: inout [UInt8]) {
        b.append(UInt8(v >> 8))
        b.append(UInt8(v & 0xFF))
    }
}
