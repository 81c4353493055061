import CASConfig
import CASCore
import CASProcess
import Foundation
import Redis

/// A `redis-server` that casfs runs for itself on a unix socket in a state
/// directory, with its data persisted there (append-only file), so the
/// zero-config mount needs no Redis set up by hand.
public final class PrivateRedis: Sendable {
    public let directory: String
    public var socketPath: String { DefaultConfig.redisSocket(redisDirectory: directory) }
    public var pidFile: String { directory + "/redis.pid" }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// The redis-server executable; nil means the one on PATH.
    public let executable: String?

    public init(directory: String, executable: String? = nil) {
        self.directory = directory
        self.executable = executable
    }

    /// A client configuration for the private server.
    public var config: RedisConfig {
        RedisConfig(unixSocket: socketPath, connectTimeout: DefaultConfig.redisConnectTimeout,
                    commandTimeout: DefaultConfig.redisCommandTimeout)
    }

    /// True if a server already answers on the socket.
    public func isRunning() -> Bool {
        guard FileManager.default.fileExists(atPath: socketPath) else { return false }
        let pool = RedisPool(RedisConfig(unixSocket: socketPath, connectTimeout: 1, commandTimeout: 2, maxConnections: 1))
        defer { pool.close() }
        return (try? pool.ping()) != nil
    }

    /// Starts the server (detached, in the background) and waits until it
    /// answers. Throws with a clear message when redis-server is not installed.
    public func start(timeout: Double = 15) throws {
        guard let exe = executable.map({ access($0, X_OK) == 0 ? $0 : nil }) ?? PrivateRedis.findExecutable("redis-server") else {
            throw Failure(description: "redis-server is not installed; casfs's zero-config mount runs its own Redis: install it with `apt-get install redis-server` (or pass --config with a !redis-connection)")
        }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw Failure(description: "cannot create the state directory \(directory): \(error.localizedDescription)")
        }
        unlink(socketPath)
        let args = [
            exe,
            "--port", "0",
            "--unixsocket", socketPath,
            "--unixsocketperm", "700",
            "--dir", directory,
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "yes",
            "--pidfile", pidFile,
            "--logfile", directory + "/redis.log",
        ]
        let status = try PrivateRedis.runToCompletion(args)
        guard status == 0 else {
            throw Failure(description: "redis-server failed to start (exit \(status)); see \(directory)/redis.log")
        }
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if isRunning() { return }
            usleep(20_000)
        }
        throw Failure(description: "redis-server did not answer on \(socketPath) within \(Int(timeout)) s; see \(directory)/redis.log")
    }

    /// Shuts the server down (its append-only file is flushed) and waits for it to exit.
    public func stop(timeout: Double = 15) {
        let pid = serverPID()
        let pool = RedisPool(RedisConfig(unixSocket: socketPath, connectTimeout: 1, commandTimeout: 5, maxConnections: 1))
        _ = try? pool.command("SHUTDOWN")
        pool.close()
        guard let pid else { return }
        let deadline = Date().addingTimeInterval(timeout)
        while kill(pid, 0) == 0 && Date() < deadline { usleep(20_000) }
        if kill(pid, 0) == 0 { kill(pid, SIGKILL) }
    }

    /// The server's process id, from its pid file.
    public func serverPID() -> pid_t? {
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
              let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else { return nil }
        return pid
    }

    /// Runs a program (which daemonizes itself) and waits for it to return.
    static func runToCompletion(_ args: [String]) throws -> Int32 {
        let pid: pid_t
        switch Spawn.quiet(args[0], args, keepStderr: true) {
        case .success(let p): pid = p
        case .failure(let e): throw Failure(description: "\(e)")
        }
        guard let status = Spawn.wait(pid) else { throw Failure(description: "waiting for \(args[0]) failed") }
        return status
    }

    static func findExecutable(_ name: String) -> String? {
        Spawn.findExecutable(name, extraDirectories: ["/usr/sbin", "/usr/bin"])
    }
}

extension DefaultConfig {
    /// The private Redis of a data directory.
    public static func privateRedis(dataDirectory: String) -> PrivateRedis {
        PrivateRedis(directory: redisDirectory(dataDirectory: dataDirectory))
    }

    /// Builds the default stack over the running private Redis `redis`.
    public static func make(dataDirectory: String, redis: PrivateRedis, metrics: Metrics = Metrics()) throws -> StorageStack {
        try make(dataDirectory: dataDirectory, redisSocket: redis.socketPath, metrics: metrics)
    }
}
