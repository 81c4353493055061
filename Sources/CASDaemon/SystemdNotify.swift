import Foundation
import Logging

/// systemd's readiness notification (`Type=notify`), spoken directly: one
/// datagram such as `READY=1` sent to the unix socket that `$NOTIFY_SOCKET`
/// names, a path or, with a leading `@`, an abstract socket name.
public struct SystemdNotify: Sendable {
    public static let variable = "NOTIFY_SOCKET"

    /// The socket's name as the variable gives it.
    public let socketName: String

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public init(socketName: String) {
        self.socketName = socketName
    }

    /// The socket named by `$NOTIFY_SOCKET`, taken out of the environment so
    /// that nothing this process starts later (a private Redis, a sandbox)
    /// reports to systemd in its name. Nil when systemd did not ask.
    public static func take() -> SystemdNotify? {
        guard let value = getenv(variable) else { return nil }
        let name = String(cString: value)
        unsetenv(variable)
        return name.isEmpty ? nil : SystemdNotify(socketName: name)
    }

    /// Sends `READY=1`. A failure is logged: the mount serves either way.
    public func ready(_ log: Logger) {
        do { try send("READY=1") } catch {
            log.warning("could not tell systemd that the mount is ready: \(error)")
        }
    }

    /// Sends one datagram holding `state` (newline-separated `KEY=VALUE` lines).
    public func send(_ state: String) throws(Failure) {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var name = Array(socketName.utf8)
        let abstract = name.first == UInt8(ascii: "@")
        guard abstract || name.first == UInt8(ascii: "/") else {
            throw Failure(description: "\(Self.variable)=\(socketName) is neither a path nor an abstract socket name (@...)")
        }
        if abstract { name[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        // A path needs room for its terminating NUL; an abstract name has none.
        guard name.count + (abstract ? 0 : 1) <= capacity, name.count > 1 else {
            throw Failure(description: "\(Self.variable)=\(socketName) is not a usable socket name")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: name)
        }
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + name.count + (abstract ? 0 : 1))

        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let message = Array(state.utf8)
        let sent = withUnsafePointer(to: &address) { a in
            a.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                message.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sa, length) }
            }
        }
        guard sent == message.count else {
            let why = sent < 0 ? String(cString: strerror(errno)) : "short send"
            throw Failure(description: "sending to \(socketName): \(why)")
        }
    }
}
