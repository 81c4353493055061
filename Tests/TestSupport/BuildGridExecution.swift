import Foundation

/// A private PostgreSQL cluster for BuildGrid's scheduler: Debian's
/// `postgresql` binaries, `initdb` run as user postgres in a directory of
/// its own, the server on a free loopback port (fsync off), database `bgd`
/// owned by role `bgd` (trust authentication). Stopped (and removed) by `stop()`.
public final class PostgresCluster: @unchecked Sendable {
    public let directory: String
    public let port: Int
    public var url: String { "postgresql://bgd@127.0.0.1:\(port)/bgd" }
    private var running = false

    /// The binaries of the newest PostgreSQL Debian installed.
    public static func binDirectory() throws -> String {
        let base = "/usr/lib/postgresql"
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: base)) ?? [])
            .compactMap(Int.init).sorted()
        guard let v = versions.last, FileManager.default.isExecutableFile(atPath: "\(base)/\(v)/bin/initdb") else {
            throw TestSupportError("PostgreSQL is not installed (no \(base)/*/bin/initdb): run scripts/install-deps (package postgresql)")
        }
        return "\(base)/\(v)/bin"
    }

    public init() throws {
        let bin = try Self.binDirectory()
        guard getpwnam("postgres") != nil else {
            throw TestSupportError("no user postgres (the postgresql package creates it): run scripts/install-deps")
        }
        directory = "/tmp/casfs-pg-\(UUID().uuidString.prefix(8))"
        port = try RedisServer.freePort()
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let setup = runBlocking("""
            set -e
            chown postgres: \(shq(directory)) && chmod 700 \(shq(directory))
            runuser -u postgres -- \(bin)/initdb -D \(shq(directory + "/data")) -A trust -U bgd >\(shq(directory + "/initdb.log")) 2>&1
            runuser -u postgres -- \(bin)/pg_ctl -D \(shq(directory + "/data")) -w -t 60 -l \(shq(directory + "/postgres.log")) \
              -o "-p \(port) -k \(directory) -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" start >/dev/null
            \(bin)/psql -h 127.0.0.1 -p \(port) -U bgd -d postgres -q -c 'create database bgd' >/dev/null
            """)
        running = true
        guard setup.ok else {
            let log = (try? String(contentsOfFile: directory + "/postgres.log", encoding: .utf8)) ?? ""
            let initLog = (try? String(contentsOfFile: directory + "/initdb.log", encoding: .utf8)) ?? ""
            stop()
            throw TestSupportError("PostgreSQL did not start: \(setup)\n\(initLog.suffix(2000))\n\(log.suffix(2000))")
        }
    }

    deinit { stop() }

    /// Stops the server (fast shutdown) and removes its directory.
    public func stop() {
        guard running else { return }
        running = false
        if let bin = try? Self.binDirectory() {
            _ = runBlocking("runuser -u postgres -- \(bin)/pg_ctl -D \(shq(directory + "/data")) -m fast -w -t 30 stop >/dev/null 2>&1")
        }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// A live BuildGrid with every service remote execution needs, for one
/// instance (default "main"): CAS, ByteStream, ActionCache (LRU, over the
/// disk store), and Execution with the Bots and Operations services, its
/// scheduler in a private PostgreSQL cluster. Starts on a free loopback
/// port; `stop()`/`start()` restart it on the same port, store and database.
public final class BuildGridExecution: @unchecked Sendable {
    public let venv: BuildGridVenv
    public let postgres: PostgresCluster
    public let directory: String
    public let port: Int
    public let instance: String
    public var address: String { "127.0.0.1:\(port)" }
    public var url: String { "grpc://127.0.0.1:\(port)" }
    public var storePath: String { directory + "/store" }
    public var logPath: String { directory + "/bgd.log" }
    private var process: Process?

    public init(directory: String, instance: String = "main", keepaliveSeconds: Int = 30) throws {
        venv = try BuildGridVenv.get()
        self.directory = directory
        self.instance = instance
        try FileManager.default.createDirectory(atPath: directory + "/store", withIntermediateDirectories: true)
        postgres = try PostgresCluster()
        port = try RedisServer.freePort()
        // 0.9 speaks psycopg 3 (postgresql+psycopg:); 0.8.16 psycopg2.
        let isNine = try !venv.version().lexicographicallyPrecedes([0, 9])
        let sqlURL = isNine ? postgres.url.replacingOccurrences(of: "postgresql:", with: "postgresql+psycopg:") : postgres.url
        let migrate = runBlocking("\(shq(venv.directory + "/bin/bgd")) migrate apply \(shq(sqlURL))")
        guard migrate.ok else {
            postgres.stop()
            throw TestSupportError("bgd migrate apply failed: \(migrate)")
        }
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
              - !sql-connection &sql
                connection-string: \(sqlURL)
                pool-size: 10
                max-overflow: 10
            storages:
              - !disk-storage &disk
                path: \(storePath)
            caches:
              - !lru-action-cache &cache
                storage: *disk
                max-cached-refs: 100000
                allow-updates: true
                cache-failed-actions: false
            schedulers:
              - !sql-scheduler &scheduler
                sql: *sql
                storage: *disk
                action-cache: *cache
                bot-session-keepalive-timeout: \(keepaliveSeconds)
                max-execution-timeout: 600
                poll-interval: 0.1
                bot-poll-interval: 0.1
                assigners:
                  - !priority-age-assigner
                    interval: 0.05
                    jitter-factor: 0.1
            instances:
              - name: "\(instance)"
                services:
                  - !cas
                    storage: *disk
                  - !bytestream
                    storage: *disk
                  - !action-cache
                    cache: *cache
                  - !execution
                    scheduler: *scheduler
                    bots-long-poll-during-execution: true

            """
        try config.write(toFile: directory + "/bgd.yaml", atomically: true, encoding: .utf8)
        do { try start() } catch {
            postgres.stop()
            throw error
        }
    }

    deinit {
        stop()
        postgres.stop()
    }

    public var isRunning: Bool { process?.isRunning ?? false }

    public func start() throws {
        guard process == nil else { return }
        let p = try startLoggedProcess(
            venv.directory + "/bin/bgd",
            ["server", "start", "-v", directory + "/bgd.yaml", "--pid-file", directory + "/bgd.pid"], log: logPath)
        process = p
        let up = pollUntil(90) { !p.isRunning || BuildGridServer.answers(port: port) }
        guard up, p.isRunning else {
            let text = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
            stop()
            throw TestSupportError("BuildGrid (execution) did not start on port \(port); log:\n\(text.suffix(4000))")
        }
    }

    /// SIGTERM, then SIGKILL after 10 s; waits until the port is closed.
    public func stop() {
        guard let p = process else { return }
        process = nil
        if p.isRunning {
            kill(p.processIdentifier, SIGTERM)
            if !pollUntil(10, { !p.isRunning }) { kill(p.processIdentifier, SIGKILL) }
        }
        p.waitUntilExit()
        _ = pollUntil(10) { !BuildGridServer.answers(port: port) }
    }

    /// Runs Tests/python/execute_client.py with `spec` (a JSON object) and
    /// returns its JSON answer.
    public func execute(_ spec: [String: Any]) throws -> [String: Any] {
        let file = directory + "/spec-\(UUID().uuidString.prefix(8)).json"
        try JSONSerialization.data(withJSONObject: spec).write(to: URL(fileURLWithPath: file))
        defer { try? FileManager.default.removeItem(atPath: file) }
        let script = BuildGridVenv.packageRoot + "/Tests/python/execute_client.py"
        let out = try venv.run(script: script, arguments: ["--target", address, "--instance", instance, file])
        guard out.status == 0, let data = out.stdout.data(using: .utf8),
              let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw TestSupportError("execute_client.py failed (exit \(out.status)):\n\(out.stderr.suffix(3000))\n\(out.stdout.suffix(1000))")
        }
        return obj
    }
}

extension BuildGridVenv {
    /// The installed BuildGrid's version, as numbers ([0, 8, 16]).
    public func version() throws -> [Int] {
        let out = try run(code: "import importlib.metadata as m; print(m.version('buildgrid'))")
        guard out.status == 0 else { throw TestSupportError("cannot read BuildGrid's version: \(out.stderr)") }
        return out.stdout.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ".").compactMap { Int($0) }
    }
}

/// `bash -c command`, waited for with waitpid(2) (stdout and stderr in a
/// temporary file). For commands that leave a daemon behind (pg_ctl start):
/// Foundation's Process was seen to miss such a child's exit here.
public func runBlocking(_ command: String) -> ShellResult {
    let file = FileManager.default.temporaryDirectory.appendingPathComponent("casfs-run-\(UUID().uuidString)").path
    defer { try? FileManager.default.removeItem(atPath: file) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, file, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    let words: [String] = ["/bin/bash", "-c", command]
    let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid: pid_t = 0
    guard posix_spawn(&pid, "/bin/bash", &actions, nil, argv, environ) == 0 else {
        return ShellResult(status: -1, stdout: "", stderr: "could not start bash")
    }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    let out = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
    return ShellResult(status: (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f), stdout: out, stderr: "")
}
