import Foundation

/// A bound unix datagram socket standing where systemd's notification
/// socket would: `name` is what `NOTIFY_SOCKET` holds for it (a path, or
/// `@name` for an abstract socket).
public final class NotifySocket {
    public let name: String
    private let fd: Int32
    private let path: String?

    public init(abstract: Bool) throws {
        let id = "casfs-notify-\(getpid())-\(UUID().uuidString.prefix(8))"
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket: errno \(errno)") }
        self.fd = fd
        let bytes: [UInt8]
        if abstract {
            name = "@" + id
            path = nil
            bytes = [0] + Array(id.utf8)
        } else {
            let p = NSTemporaryDirectory() + id + ".sock"
            name = p
            path = p
            bytes = Array(p.utf8) + [0]
        }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + bytes.count)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0 else {
            close(fd)
            throw TestSupportError("bind \(name): errno \(errno)")
        }
    }

    /// The next datagram; nil when none came within `seconds` (a bound on
    /// the wait so that a missing message fails a test instead of hanging it).
    public func receive(within seconds: Int = 60) -> String? {
        var timeout = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &buffer, buffer.count, 0)
        return n < 0 ? nil : String(decoding: buffer[0..<n], as: UTF8.self)
    }

    deinit {
        close(fd)
        if let path { unlink(path) }
    }
}
