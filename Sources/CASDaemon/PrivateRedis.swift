import CASConfig
import CASCore
import CASProcess
import Foundation
import Logging
import Redis
import Synchronization

/// A `redis-server` that casfs runs for itself on a unix socket in a state
/// directory, with its data persisted there (append-only file), so the
/// zero-config mount needs no Redis set up by hand.
///
/// One server per directory: a server holds `server.lock` (an flock on a
/// descriptor it inherits at start, so the lock lasts exactly as long as
/// the server and the children it forks) and a server is started only by
/// whoever took that lock. The server runs in a session of its own, is
/// known by a pidfd (never by a pid that could be reused), and is told
/// apart from a slow or stopped one by that pidfd alone: a failed connect
/// (EMFILE, a timeout) never reads as "the server is gone".
public final class PrivateRedis: Sendable {
    public let directory: String
    public var socketPath: String { DefaultConfig.redisSocket(redisDirectory: directory) }
    public var pidFile: String { directory + "/redis.pid" }
    public var lockFile: String { directory + "/server.lock" }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// The redis-server executable; nil means the one on PATH.
    public let executable: String?

    /// The server this object started or found, by pidfd.
    private let server = Mutex<ProcessHandle?>(nil)

    /// Where starting the server (and waiting for it to load) is reported.
    let log: Logger

    public init(directory: String, executable: String? = nil, log: Logger = Logger(label: "casfs.private-redis")) {
        self.directory = directory
        self.executable = executable
        self.log = log
    }

    /// A client configuration for the private server.
    public var config: RedisConfig {
        RedisConfig(unixSocket: socketPath, connectTimeout: DefaultConfig.redisConnectTimeout,
                    commandTimeout: DefaultConfig.redisCommandTimeout)
    }

    /// True if a server already answers on the socket (and has its data loaded).
    public func isRunning() -> Bool {
        probe() == .serving
    }

    /// What a server on the socket answers.
    public enum Answer: Equatable, Sendable {
        /// PONG: it serves.
        case serving
        /// It is there but still loading its data (`-LOADING` to PING):
        /// it serves once its append-only file is read; `percent` and
        /// `etaSeconds` are its progress, when INFO tells.
        case loading(percent: Double?, etaSeconds: Int?)
        /// No answer (no socket, refused, timed out, another error).
        case none
    }

    /// Asks the server on the socket how it is: PING, and INFO persistence
    /// (which a loading server answers too) when it says it is loading.
    public func probe() -> Answer {
        guard FileManager.default.fileExists(atPath: socketPath) else { return .none }
        return RedisProbe.ask(socketPath: socketPath, timeout: 2)
    }

    /// The progress a server's `INFO persistence` reports while it loads.
    static func loadingProgress(_ info: String) -> Answer {
        var fields: [Substring: Substring] = [:]
        for line in info.split(whereSeparator: \.isNewline) {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[line[..<colon]] = line[line.index(after: colon)...]
        }
        let percent = fields["loading_loaded_perc"].flatMap { Double($0) }.flatMap { $0.isFinite && $0 >= 0 ? $0 : nil }
        let eta = fields["loading_eta_seconds"].flatMap { Int($0) }.flatMap { $0 >= 0 ? $0 : nil }
        return .loading(percent: percent, etaSeconds: eta)
    }

    // MARK: the directory's lock

    /// What `tryLock` found.
    public enum LockState {
        /// Taken: the descriptor holds it (close-on-exec); give it to `launch` or close it.
        case taken(Int32)
        /// A server (or a child it forked) holds the directory.
        case held
        /// The lock file could not be opened (EMFILE, ...): nothing can be said.
        case unknown(Int32)
    }

    /// Tries to take the directory's lock without waiting.
    public func tryLock() -> LockState {
        let fd = open(lockFile, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { return .unknown(errno) }
        return tryLock(fd)
    }

    /// Tries to take the lock on `fd` (the lock file, opened): on success the
    /// descriptor is the lock; otherwise it is closed.
    public func tryLock(_ fd: Int32) -> LockState {
        if flock(fd, LOCK_EX | LOCK_NB) == 0 { return .taken(fd) }
        let e = errno
        close(fd)
        return e == EWOULDBLOCK ? .held : .unknown(e)
    }

    /// True while a server (or a child it forked) holds the directory; nil
    /// if that cannot be told (no descriptor to spare).
    public func isHeld() -> Bool? {
        switch tryLock() {
        case .taken(let fd):
            close(fd)
            return false
        case .held: return true
        case .unknown: return nil
        }
    }

    // MARK: starting and stopping

    /// Starts the server unless one holds the directory already, and waits
    /// until it serves. With a server there, waits for it to serve (or to
    /// go, then starts one). Throws with a clear message when redis-server
    /// is not installed, and stops a server that does not come up.
    /// `timeout` bounds only the wait for a first answer: a server loading
    /// its data (however long that takes) is waited for, never stopped.
    /// Returns true if this call started it.
    @discardableResult
    public func start(timeout: Double = 15) throws -> Bool {
        let exe = try findServer()
        try prepareDirectory()
        let deadline = Date().addingTimeInterval(timeout)
        var loading = LoadingReport(log: log, socketPath: socketPath)
        while true {
            switch tryLock() {
            case .taken(let fd):
                try launch(exe: exe, lock: fd, timeout: max(1, deadline.timeIntervalSinceNow))
                return true
            case .held:
                switch probe() {
                case .serving:
                    loading.finished()
                    adopt()
                    return false
                case .loading(let percent, let eta):
                    // Another process's server, answering: it is there, and loads.
                    loading.note(percent: percent, eta: eta)
                    usleep(100_000)
                    continue
                case .none:
                    break
                }
            case .unknown(let e):
                throw Failure(description: "cannot open \(lockFile): \(String(cString: strerror(e)))")
            }
            if Date() >= deadline && !loading.seen {
                throw Failure(description: "another redis-server holds \(directory) (\(lockFile)) and does not answer on \(socketPath) within \(Int(timeout)) s; see \(directory)/redis.log")
            }
            usleep(50_000)
        }
    }

    /// Logs that a server is loading its data once, its progress now and
    /// then (every 30 s), and the end of the load.
    struct LoadingReport {
        let log: Logger
        let socketPath: String
        private(set) var seen = false
        private var since = Date()
        private var lastProgress = Date()

        init(log: Logger, socketPath: String) {
            self.log = log
            self.socketPath = socketPath
        }

        mutating func note(percent: Double?, eta: Int?) {
            let progress = percent.map { String(format: " (%.0f%% loaded", $0) + (eta.map { ", about \($0) s left)" } ?? ")") } ?? ""
            if !seen {
                seen = true
                since = Date()
                lastProgress = since
                log.notice("the private Redis on \(socketPath) is loading its data\(progress); waiting for it")
            } else if Date().timeIntervalSince(lastProgress) >= 30 {
                lastProgress = Date()
                log.notice("the private Redis is still loading its data\(progress)")
            }
        }

        func finished() {
            guard seen else { return }
            log.notice("the private Redis loaded its data in \(Int(Date().timeIntervalSince(since).rounded())) s")
        }
    }

    /// Starts a server holding `lock` (the directory's lock, taken; this
    /// call closes it) and waits until it serves. A server that exits, or
    /// that does not answer at all within `timeout` seconds, is stopped, and
    /// the start fails. A server that answers it is loading its data is
    /// alive: it is waited for as long as it loads, never stopped; if
    /// `cancelled` becomes true meanwhile, the wait ends (with an error)
    /// and the server is left loading, known to this object, for `stop()`.
    public func launch(exe: String? = nil, lock: Int32, timeout: Double = 15,
                       cancelled: () -> Bool = { false }) throws {
        let lockInChild: Int32 = 3
        let exe = try exe ?? findServer()
        unlink(socketPath)
        unlink(pidFile)
        let args = [
            exe,
            "--port", "0",
            "--unixsocket", socketPath,
            "--unixsocketperm", "700",
            "--dir", directory,
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--pidfile", pidFile,
            "--logfile", directory + "/redis.log",
        ]
        let spawned = Spawn.start(exe, args, stdout: .null, stderr: .inherit, descriptors: [lockInChild: lock],
                                  newSession: true)
        // The server's copy holds the lock from here on; a failed start lets go of it.
        close(lock)
        let pid: pid_t
        switch spawned {
        case .success(let p): pid = p
        case .failure(let e): throw Failure(description: "\(e)")
        }
        guard let handle = ProcessHandle(pid: pid) else {
            kill(pid, SIGKILL)
            _ = Spawn.wait(pid)
            throw Failure(description: "cannot watch redis-server (pid \(pid)): \(String(cString: strerror(errno)))")
        }
        let deadline = Date().addingTimeInterval(timeout)
        var loading = LoadingReport(log: log, socketPath: socketPath)
        while true {
            switch probe() {
            case .serving:
                server.withLock { $0 = handle }
                loading.finished()
                return
            case .loading(let percent, let eta) where !handle.hasExited:
                // Alive, reading its append-only file: no deadline while it does.
                server.withLock { $0 = handle }
                loading.note(percent: percent, eta: eta)
            case .loading, .none:
                break
            }
            if handle.hasExited {
                server.withLock { if $0 === handle { $0 = nil } }
                let end = Spawn.wait(pid, seconds: 1)
                throw Failure(description: "redis-server failed to start (\(end.map { "\($0)" } ?? "exited")); see \(directory)/redis.log")
            }
            if loading.seen {
                if cancelled() {
                    throw Failure(description: "stopped waiting for the private Redis (pid \(pid)), which is loading its data")
                }
                usleep(100_000)
                continue
            }
            if Date() >= deadline { break }
            usleep(20_000)
        }
        // Did not come up: not left running.
        handle.signal(SIGKILL)
        _ = handle.waitForExit(timeout: 10)
        _ = Spawn.wait(pid, seconds: 1)
        throw Failure(description: "redis-server did not answer on \(socketPath) within \(Int(timeout)) s (stopped again); see \(directory)/redis.log")
    }

    /// The server of this directory, by pidfd: the one this object started,
    /// else the one its pid file names if that process serves this
    /// directory. Nil if there is none (or it cannot be told).
    public func serverHandle() -> ProcessHandle? {
        if let h = server.withLock({ $0 }), !h.hasExited { return h }
        adopt()
        return server.withLock { $0 }
    }

    /// Takes the server its pid file names for this object's own, if that
    /// process is a redis-server serving this directory.
    private func adopt() {
        guard let pid = serverPID(), serves(pid: pid), let handle = ProcessHandle(pid: pid),
              !handle.hasExited, serves(pid: pid) else { return }
        server.withLock { $0 = handle }
    }

    /// True if process `pid` is a redis-server listening on this
    /// directory's socket: its command line (which redis-server rewrites
    /// to `redis-server unixsocket:<path>`) names the socket. A stale pid
    /// file's reused pid does not pass.
    func serves(pid: pid_t) -> Bool {
        guard let cmdline = try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline")) else { return false }
        let text = String(decoding: cmdline.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
        return text.contains("redis-server") && text.contains(socketPath)
    }

    /// Shuts the server down (its append-only file is flushed) and waits
    /// for it to exit: SHUTDOWN, else SIGTERM (which redis-server takes as
    /// a shutdown too), then SIGKILL after `timeout`. A zombie has exited.
    public func stop(timeout: Double = 15) {
        let handle = serverHandle()
        let pool = RedisPool(RedisConfig(unixSocket: socketPath, connectTimeout: 1, commandTimeout: 5, maxConnections: 1))
        let asked = (try? pool.command("SHUTDOWN")) != nil
        pool.close()
        guard let handle else { return }
        if !asked || !handle.waitForExit(timeout: 1) { handle.signal(SIGTERM) }
        if !handle.waitForExit(timeout: timeout) {
            handle.signal(SIGKILL)
            _ = handle.waitForExit(timeout: 10)
        }
        // Ours to reap if it was our child (not if another process started it).
        var status: Int32 = 0
        _ = waitpid(handle.pid, &status, WNOHANG)
        server.withLock { if $0 === handle { $0 = nil } }
    }

    /// The server's process id, from its pid file.
    public func serverPID() -> pid_t? {
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
              let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else { return nil }
        return pid
    }

    private func findServer() throws -> String {
        guard let exe = executable.map({ access($0, X_OK) == 0 ? $0 : nil }) ?? PrivateRedis.findExecutable("redis-server") else {
            throw Failure(description: "redis-server is not installed; casfs's zero-config mount runs its own Redis: install it with `apt-get install redis-server` (or pass --config with a !redis-connection)")
        }
        return exe
    }

    private func prepareDirectory() throws {
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw Failure(description: "cannot create the state directory \(directory): \(error.localizedDescription)")
        }
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
