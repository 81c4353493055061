import Foundation

/// The head of one HTTP/1.x request, parsed from bytes a client sent:
/// only what the metrics endpoint needs, every size checked.
struct HTTPRequestHead: Equatable {
    var method: String
    var target: String
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    var minorVersion: Int
    var contentLength: Int
    var keepAlive: Bool

    enum Problem: Error, Equatable {
        /// Not HTTP/1.x as we read it: 400.
        case malformed
        /// A body we will not read (chunked, or larger than allowed): 413, then close.
        case bodyTooLarge
    }

    /// Parses the head in `bytes` (up to, not including, the blank line).
    static func parse(_ bytes: ArraySlice<UInt8>, maxBody: Int) throws(Problem) -> HTTPRequestHead {
        var lines = bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).map { line -> ArraySlice<UInt8> in
            line.last == UInt8(ascii: "\r") ? line.dropLast() : line
        }
        // Empty lines before the request line are allowed (RFC 9112 2.2).
        while let first = lines.first, first.isEmpty { lines.removeFirst() }
        guard let requestLine = lines.first else { throw .malformed }
        let parts = requestLine.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[0].isEmpty, !parts[1].isEmpty,
              parts[0].allSatisfy({ isToken($0) }) else { throw .malformed }
        let version = String(decoding: parts[2], as: UTF8.self)
        let minor: Int
        switch version {
        case "HTTP/1.1": minor = 1
        case "HTTP/1.0": minor = 0
        default: throw .malformed
        }
        var contentLength = 0
        var sawLength = false
        var connectionTokens: [String] = []
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon > line.startIndex,
                  line[line.startIndex..<colon].allSatisfy({ isToken($0) }) else { throw .malformed }
            let name = String(decoding: line[line.startIndex..<colon], as: UTF8.self).lowercased()
            let value = String(decoding: line[line.index(after: colon)...], as: UTF8.self)
                .trimmingCharacters(in: .whitespaces)
            switch name {
            case "content-length":
                // Digits only; a second, different value is an attack.
                guard !value.isEmpty, value.count <= 18, value.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                      let n = Int(value) else { throw .malformed }
                if sawLength && n != contentLength { throw .malformed }
                sawLength = true
                contentLength = n
            case "transfer-encoding":
                throw .bodyTooLarge
            case "connection":
                connectionTokens += value.lowercased().split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            default:
                continue
            }
        }
        if contentLength > maxBody { throw .bodyTooLarge }
        let keepAlive = minor == 1 ? !connectionTokens.contains("close") : connectionTokens.contains("keep-alive")
        return HTTPRequestHead(method: String(decoding: parts[0], as: UTF8.self),
                               target: String(decoding: parts[1], as: UTF8.self),
                               minorVersion: minor, contentLength: contentLength, keepAlive: keepAlive)
    }

    /// RFC 9110 tchar.
    static func isToken(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return Array("!#$%&'*+-.^_`|~".utf8).contains(c)
        }
    }
}
