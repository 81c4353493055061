import Foundation
import Redis

/// A private `dnsmasq` for one test, answering on 127.0.0.1 at a free port
/// with the SRV records it was given and nothing else (no upstream, no
/// /etc/hosts). Stopped when released.
public final class DNSServer: @unchecked Sendable {
    public let port: Int
    private let process: Process

    /// `records`: (record name, target, port) in the order given to dnsmasq.
    public init(srv records: [(name: String, target: String, port: Int)]) throws {
        guard let exe = RedisServer.findExecutable("dnsmasq") else {
            throw TestSupportError("dnsmasq not found on PATH; install it (apt-get install dnsmasq-base, or scripts/install-deps) to run these tests")
        }
        // dnsmasq listens on UDP and TCP; a port taken meanwhile makes it exit
        // with status 2, and then another port is tried.
        var attempt = 0
        while true {
            attempt += 1
            let port = try DNSServer.freeUDPPort()
            var args = [
                "--keep-in-foreground", "--port=\(port)", "--listen-address=127.0.0.1", "--bind-interfaces",
                "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--pid-file=", "--log-facility=/dev/null",
            ]
            if getuid() == 0 { args.append("--user=root") }
            for r in records { args.append("--srv-host=\(r.name),\(r.target),\(r.port)") }
            let p = Process()
            p.executableURL = URL(fileURLWithPath: exe)
            p.arguments = args
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            let resolver = DNSSRVResolver(servers: [RedisHostPort(host: "127.0.0.1", port: port)], timeout: 0.2)
            let probe = records.first?.name ?? "probe.invalid"
            do {
                try RedisSentinelCluster.poll("dnsmasq to answer on 127.0.0.1:\(port)", limit: 20) {
                    guard p.isRunning else { throw TestSupportError("dnsmasq exited with status \(p.terminationStatus)") }
                    return !(try resolver.lookup(probe)).isEmpty
                }
            } catch {
                if p.isRunning {
                    kill(p.processIdentifier, SIGKILL)
                    p.waitUntilExit()
                }
                if attempt < 5 && p.terminationStatus == 2 { continue }
                throw error
            }
            self.port = port
            self.process = p
            return
        }
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    public var address: RedisHostPort { RedisHostPort(host: "127.0.0.1", port: port) }

    /// A UDP port on 127.0.0.1 that was free a moment ago (and free for TCP too).
    static func freeUDPPort() throws -> Int {
        for _ in 0..<20 {
            let p = try RedisServer.freePort()
            if try udpPortFree(p) { return p }
        }
        throw TestSupportError("no port free for both TCP and UDP")
    }

    private static func udpPortFree(_ port: Int) throws -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket() failed: errno \(errno)") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        return bound == 0
    }
}
