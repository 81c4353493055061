import Foundation
import Redis

/// Errors of the test helpers; they make a test fail with a clear message.
public struct TestSupportError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A private `redis-server` for one test: on a unix socket in a fresh temp
/// directory, or on a free TCP port, optionally with a password. Stopped by
/// `stop()` or when released.
public final class RedisServer: @unchecked Sendable {
    public let directory: URL
    /// Set for unix-socket servers.
    public let socketPath: String?
    /// Set for TCP servers.
    public let port: Int?
    public let password: String?
    /// More `redis-server` arguments (replication settings, for instance).
    public let extraArguments: [String]
    private let executable: String
    private var process: Process?
    private let logPath: String

    /// Starts a server on a unix socket in a new temp directory.
    public static func unixSocket(password: String? = nil) throws -> RedisServer {
        try RedisServer(tcp: false, password: password)
    }

    /// Starts a server on a free TCP port on 127.0.0.1, with `arguments` added to its command line.
    public static func tcp(password: String? = nil, arguments: [String] = []) throws -> RedisServer {
        try RedisServer(tcp: true, password: password, arguments: arguments)
    }

    private init(tcp: Bool, password: String?, arguments: [String] = []) throws {
        guard let exe = RedisServer.findExecutable("redis-server") else {
            throw TestSupportError("redis-server not found on PATH; install it (apt-get install redis-server) to run these tests")
        }
        executable = exe
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("casfs-redis-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        socketPath = tcp ? nil : directory.appendingPathComponent("redis.sock").path
        port = tcp ? try RedisServer.freePort() : nil
        self.password = password
        extraArguments = arguments
        logPath = directory.appendingPathComponent("redis.log").path
        try start()
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(at: directory)
    }

    /// A client configuration for this server.
    public func config(db: Int = 0, password: String?? = nil, commandTimeout: Double = 5, connectTimeout: Double = 2) -> RedisConfig {
        RedisConfig(
            host: "127.0.0.1", port: port ?? 0, unixSocket: socketPath,
            password: password ?? self.password, db: db,
            connectTimeout: connectTimeout, commandTimeout: commandTimeout,
            minBackoff: 0.02, maxBackoff: 0.2)
    }

    /// A pool for this server.
    public func pool(db: Int = 0, commandTimeout: Double = 5) -> RedisPool {
        RedisPool(config(db: db, commandTimeout: commandTimeout))
    }

    /// Process id of the running server.
    public var pid: Int32? { process?.processIdentifier }

    /// Starts the server (again) on the same socket or port, and waits until it answers PING.
    public func start() throws {
        guard process == nil else { return }
        var args = [
            "--port", String(port ?? 0),
            "--bind", "127.0.0.1",
            "--dir", directory.path,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", logPath,
        ]
        if let socketPath { args += ["--unixsocket", socketPath, "--unixsocketperm", "700"] }
        if let password { args += ["--requirepass", password] }
        args += extraArguments
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        process = p
        let probe = RedisPool(RedisConfig(
            host: "127.0.0.1", port: port ?? 0, unixSocket: socketPath, password: password,
            connectTimeout: 0.5, commandTimeout: 1, minBackoff: 0.001, maxBackoff: 0.001))
        let deadline = Date().addingTimeInterval(10)
        var last: Error?
        while Date() < deadline {
            guard p.isRunning else {
                let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
                process = nil
                throw TestSupportError("redis-server exited with status \(p.terminationStatus) on start:\n\(log)")
            }
            guard listening() else {
                usleep(5_000)
                continue
            }
            do {
                try probe.ping()
                return
            } catch {
                last = error
                usleep(10_000)
            }
        }
        stop()
        throw TestSupportError("redis-server did not answer PING within 10 s: \(String(describing: last))")
    }

    /// True once the socket file exists or the TCP port accepts connections.
    private func listening() -> Bool {
        if let socketPath { return FileManager.default.fileExists(atPath: socketPath) }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port ?? 0).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }

    /// Kills the server and waits for it to exit. Its data is lost.
    public func stop() {
        guard let p = process else { return }
        process = nil
        if p.isRunning {
            kill(p.processIdentifier, SIGCONT)
            kill(p.processIdentifier, SIGKILL)
        }
        p.waitUntilExit()
    }

    /// Stops and starts the server again at the same address.
    public func restart() throws {
        stop()
        try start()
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel but nothing answers.
    public func pause() {
        if let p = process { kill(p.processIdentifier, SIGSTOP) }
    }

    /// Resumes a paused server.
    public func resume() {
        if let p = process { kill(p.processIdentifier, SIGCONT) }
    }

    static func findExecutable(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") + ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// A TCP port that was free a moment ago (bound to port 0, then released).
    public static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket() failed: errno \(errno)") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else { throw TestSupportError("bind() failed: errno \(errno)") }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let named = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        guard named == 0 else { throw TestSupportError("getsockname() failed: errno \(errno)") }
        return Int(UInt16(bigEndian: addr.sin_port))
    }
}
