import Foundation

/// A live BuildGrid server (`bgd server start`) on a free loopback port, with
/// only the CAS and ByteStream services over `!redis-index` on `!disk-storage`,
/// for instances "" and "main". It owns a private Redis server. Stops (and
/// can be restarted on the same port and store) from the test.
public final class BuildGridServer: @unchecked Sendable {
    public let venv: BuildGridVenv
    public let directory: String
    public let port: Int
    public let redis: RedisServer
    public var address: String { "127.0.0.1:\(port)" }
    public var url: String { "grpc://127.0.0.1:\(port)" }
    public var storePath: String { directory + "/store" }
    public var logPath: String { directory + "/bgd.log" }
    private var process: Process?

    /// Starts Redis and BuildGrid under `directory` (created). Throws, with
    /// BuildGrid's log, if the server does not answer within a minute.
    public init(directory: String) throws {
        venv = try BuildGridVenv.get()
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory + "/store", withIntermediateDirectories: true)
        redis = try RedisServer.tcp()
        port = try RedisServer.freePort()
        let config = """
            server:
              - !channel
                address: "127.0.0.1:\(port)"
                insecure-mode: true
            authorization:
              method: none
            monitoring:
              enabled: false
            connections:
              - !redis-connection &redis
                host: 127.0.0.1
                port: \(redis.port!)
            storages:
              - !disk-storage &disk
                path: \(storePath)
              - !redis-index &cas
                storage: *disk
                redis: *redis
            instances:
              - name: ["", "main"]
                services:
                  - !cas
                    storage: *cas
                  - !bytestream
                    storage: *cas

            """
        try config.write(toFile: directory + "/bgd.yaml", atomically: true, encoding: .utf8)
        try start()
    }

    deinit { stop() }

    public var isRunning: Bool { process?.isRunning ?? false }

    public func start() throws {
        guard process == nil else { return }
        let p = try startLoggedProcess(
            venv.directory + "/bin/bgd",
            ["server", "start", "-v", directory + "/bgd.yaml", "--pid-file", directory + "/bgd.pid"], log: logPath)
        process = p
        let up = pollUntil(60) { !p.isRunning || BuildGridServer.answers(port: port) }
        guard up, p.isRunning else {
            let text = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
            stop()
            throw TestSupportError("BuildGrid did not start on port \(port); log:\n\(text.suffix(4000))")
        }
    }

    /// SIGTERM, then SIGKILL after 10 s; waits for the process to exit.
    public func stop() {
        guard let p = process else { return }
        process = nil
        if p.isRunning {
            kill(p.processIdentifier, SIGCONT)
            kill(p.processIdentifier, SIGTERM)
            if !pollUntil(10, { !p.isRunning }) { kill(p.processIdentifier, SIGKILL) }
        }
        p.waitUntilExit()
        // Until the port is free again, a restart could not bind it.
        _ = pollUntil(10) { !BuildGridServer.answers(port: port) }
    }

    /// SIGSTOP: the port still accepts connections but nothing answers.
    public func pause() {
        if let p = process, p.isRunning { kill(p.processIdentifier, SIGSTOP) }
    }

    public func resume() {
        if let p = process, p.isRunning { kill(p.processIdentifier, SIGCONT) }
    }

    /// Runs Tests/python/reapi_client.py (BuildGrid's own gRPC stubs) against this server.
    public func client(_ args: [String], instance: String = "") throws -> BuildGridVenv.Output {
        let script = BuildGridVenv.packageRoot + "/Tests/python/reapi_client.py"
        return try venv.run(script: script, arguments: ["--target", address, "--instance", instance] + args)
    }

    static func answers(port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
    }
}
