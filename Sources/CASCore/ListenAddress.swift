/// A TCP address to listen on, written `HOST:PORT`: an IPv4 address
/// (`127.0.0.1:9100`), an IPv6 address in brackets (`[::1]:9100`) or a host
/// name (`localhost:9100`). The host is required: all interfaces are
/// `0.0.0.0` or `[::]`, never an empty host.
public struct ListenAddress: Sendable, Equatable, CustomStringConvertible {
    /// The host as it is resolved or bound: no brackets around IPv6.
    public let host: String
    public let port: Int

    public struct Invalid: Error, Equatable, CustomStringConvertible {
        public let description: String
    }

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init(parsing text: String) throws(Invalid) {
        func bad(_ why: String) -> Invalid { Invalid(description: "'\(text)' is not HOST:PORT: \(why)") }
        guard let colon = text.lastIndex(of: ":") else {
            throw bad("the port is missing")
        }
        var host = Substring(text[..<colon])
        let portText = text[text.index(after: colon)...]
        if host.hasPrefix("[") || host.hasSuffix("]") {
            guard host.count > 2, host.hasPrefix("["), host.hasSuffix("]") else {
                throw bad("unbalanced brackets")
            }
            host = host.dropFirst().dropLast()
            guard host.contains(":"), host.allSatisfy(ListenAddress.isIPv6Character) else {
                throw bad("brackets hold an IPv6 address")
            }
        } else {
            guard !host.isEmpty else {
                throw bad("the host is missing (all interfaces: 0.0.0.0 or [::])")
            }
            guard !host.contains(":") else {
                throw bad("an IPv6 address goes in brackets, e.g. [::1]:9100")
            }
            guard host.allSatisfy(ListenAddress.isHostNameCharacter), host.first != "-", host.first != "." else {
                throw bad("'\(host)' is neither an IP address nor a host name")
            }
        }
        // At most 5 digits, so the conversion cannot overflow.
        guard !portText.isEmpty, portText.count <= 5, portText.allSatisfy({ $0.isASCII && $0.isNumber }),
              let port = Int(portText), (1...65535).contains(port) else {
            throw bad("the port must be a number from 1 to 65535")
        }
        self.init(host: String(host), port: port)
    }

    /// `host:port`, with brackets around an IPv6 host.
    public var description: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    private static func isHostNameCharacter(_ c: Character) -> Bool {
        c.isASCII && (c.isLetter || c.isNumber || c == "-" || c == ".")
    }

    /// Hex digits, colons, dots (an embedded IPv4 address) and a `%zone`
    /// (an interface name); the resolver judges the rest.
    private static func isIPv6Character(_ c: Character) -> Bool {
        c.isASCII && (c.isLetter || c.isNumber || c == ":" || c == "." || c == "%")
    }
}
