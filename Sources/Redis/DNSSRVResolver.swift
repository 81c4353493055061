import Foundation

/// Looks up SRV records over UDP: asks each DNS server in turn (the given
/// ones, or the `nameserver` lines of /etc/resolv.conf) and returns the
/// records of the first that answers. BuildGrid looks up exactly the
/// configured name (no search domains), and so does this.
public struct DNSSRVResolver: Sendable {
    public let servers: [RedisHostPort]
    /// Seconds to wait for each server.
    public let timeout: Double

    public init(servers: [RedisHostPort] = [], timeout: Double = 2) {
        self.servers = servers.isEmpty ? DNSSRVResolver.systemServers() : servers
        self.timeout = timeout
    }

    /// The SRV records of `name`, in the order the server sent them.
    public func lookup(_ name: String) throws -> [DNSSRVRecord] {
        var failures: [String] = []
        for server in servers {
            do {
                let records = try ask(server, name)
                guard !records.isEmpty else { throw DNSSRVMessage.Failure("no SRV records") }
                return records
            } catch let f as DNSSRVMessage.Failure {
                failures.append("\(server): \(f)")
                if f.description == "no such DNS name" || f.description == "no SRV records" { break }
            }
        }
        throw DNSSRVMessage.Failure("SRV lookup of '\(name)' failed: \(failures.joined(separator: "; "))")
    }

    private func ask(_ server: RedisHostPort, _ name: String) throws -> [DNSSRVRecord] {
        guard (1...65535).contains(server.port) else { throw DNSSRVMessage.Failure("not a port number") }
        let id = UInt16.random(in: 0...UInt16.max)
        let query = try DNSSRVMessage.query(name: name, id: id)
        var storage = sockaddr_storage()
        var length: socklen_t = 0
        let host = server.host.split(separator: "%", maxSplits: 1).first.map(String.init) ?? server.host
        let port = UInt16(server.port).bigEndian
        let family: Int32
        if host.contains(":") {
            family = AF_INET6
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            a.sin6_port = port
            guard inet_pton(AF_INET6, host, &a.sin6_addr) == 1 else { throw DNSSRVMessage.Failure("not an IP address") }
            withUnsafeBytes(of: a) { src in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: src) } }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        } else {
            family = AF_INET
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = port
            guard inet_pton(AF_INET, host, &a.sin_addr) == 1 else { throw DNSSRVMessage.Failure("not an IP address") }
            withUnsafeBytes(of: a) { src in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: src) } }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
        }
        let fd = socket(family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw DNSSRVMessage.Failure("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let connected = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) }
        }
        guard connected == 0 else { throw DNSSRVMessage.Failure("connect: \(String(cString: strerror(errno)))") }
        guard send(fd, query, query.count, 0) == query.count else {
            throw DNSSRVMessage.Failure("send: \(String(cString: strerror(errno)))")
        }
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(max(0.001, timeout) * 1e9)
        var buffer = [UInt8](repeating: 0, count: Int(DNSSRVMessage.udpPayload))
        while true {
            let now = DispatchTime.now().uptimeNanoseconds
            guard now < deadline else { throw DNSSRVMessage.Failure("no answer within \(timeout) s") }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, Int32(clamping: (deadline - now) / 1_000_000 + 1))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { continue }
            let n = recv(fd, &buffer, buffer.count, 0)
            guard n >= 0 else { throw DNSSRVMessage.Failure("recv: \(String(cString: strerror(errno)))") }
            let message = Array(buffer[0..<n])
            // A datagram that is not the answer to this query (another id) is ignored.
            if message.count >= 2 && DNSSRVMessage.read16(message, 0) != id { continue }
            return try DNSSRVMessage.records(in: message, id: id)
        }
    }

    /// The `nameserver` lines of /etc/resolv.conf, or 127.0.0.1 when there are none.
    static func systemServers(_ path: String = "/etc/resolv.conf") -> [RedisHostPort] {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        var out: [RedisHostPort] = []
        for line in text.split(whereSeparator: \.isNewline) {
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if words.count >= 2 && words[0] == "nameserver" {
                out.append(RedisHostPort(host: String(words[1]), port: 53))
            }
        }
        return out.isEmpty ? [RedisHostPort(host: "127.0.0.1", port: 53)] : out
    }
}
