import Foundation

/// A live BuildGrid server (`bgd server start`) on a free loopback port, with
/// only the CAS and ByteStream services over `!redis-index` on `!disk-storage`,
/// for instances "" and "main". It owns a private Redis server. Stops (and
/// can be restarted on the same port and store) from the test.
///
/// By default the channel is plaintext and calls need no authorization;
/// `Security` turns on TLS (optionally requiring client certificates) and
/// JWT authorization.
public final class BuildGridServer: @unchecked Sendable {
    /// TLS and authorization for the server's `!channel` and `authorization`.
    public struct Security: Sendable {
        /// `credentials.tls-server-key` / `tls-server-cert`: TLS when both are set.
        public var serverKey: String?
        public var serverCert: String?
        /// `credentials.tls-client-certs`: the CAs client certificates must
        /// chain to; BuildGrid then requires a client certificate.
        public var clientCAs: String?
        /// `authorization: {method: jwt, algorithm: hs256, secret: <file>}`.
        public var jwtSecretFile: String?

        public init(serverKey: String? = nil, serverCert: String? = nil, clientCAs: String? = nil,
                    jwtSecretFile: String? = nil) {
            self.serverKey = serverKey
            self.serverCert = serverCert
            self.clientCAs = clientCAs
            self.jwtSecretFile = jwtSecretFile
        }

        public static let insecure = Security()
        public var tls: Bool { serverKey != nil && serverCert != nil }
    }

    public let venv: BuildGridVenv
    public let directory: String
    public let port: Int
    public let redis: RedisServer
    public let security: Security
    public var address: String { "127.0.0.1:\(port)" }
    public var url: String { "\(security.tls ? "grpcs" : "grpc")://127.0.0.1:\(port)" }
    /// Arguments for Tests/python/reapi_client.py that make BuildGrid's own
    /// client connect to this server (`--url`, `--server-cert`,
    /// `--client-key`, `--client-cert`, `--token-file`). Empty: a plaintext
    /// channel to `address`.
    public var clientCredentials: [String] = []
    public var storePath: String { directory + "/store" }
    public var logPath: String { directory + "/bgd.log" }
    private var process: Process?

    /// Starts Redis and BuildGrid under `directory` (created). Throws, with
    /// BuildGrid's log, if the server does not answer within a minute.
    public init(directory: String, security: Security = .insecure) throws {
        venv = try BuildGridVenv.get()
        self.directory = directory
        self.security = security
        try FileManager.default.createDirectory(atPath: directory + "/store", withIntermediateDirectories: true)
        redis = try RedisServer.tcp()
        port = try RedisServer.freePort()
        var channel = "    insecure-mode: true"
        if let key = security.serverKey, let cert = security.serverCert {
            channel = """
                    insecure-mode: false
                    credentials:
                      tls-server-key: \(key)
                      tls-server-cert: \(cert)
                """
            if let cas = security.clientCAs { channel += "\n      tls-client-certs: \(cas)" }
        }
        var authorization = "  method: none"
        if let secret = security.jwtSecretFile {
            authorization = """
                  method: jwt
                  algorithm: hs256
                  secret: \(secret)
                """
        }
        let config = """
            server:
              - !channel
                address: "127.0.0.1:\(port)"
            \(channel)
            authorization:
            \(authorization)
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

    /// SIGKILL (a stopped server too); waits for the process to exit and the
    /// port to close. `start()` brings it back on the same port and store.
    public func kill9() {
        guard let p = process else { return }
        process = nil
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
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
    public func client(_ args: [String], instance: String = "", credentials: [String]? = nil) throws -> BuildGridVenv.Output {
        let script = BuildGridVenv.packageRoot + "/Tests/python/reapi_client.py"
        let connect = credentials ?? clientCredentials
        let target = connect.isEmpty ? ["--target", address] : ["--url", url] + connect
        return try venv.run(script: script, arguments: target + ["--instance", instance] + args)
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
