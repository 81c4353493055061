import Foundation
import Redis

/// A private Redis Sentinel setup for one test, all on 127.0.0.1 at free
/// ports: a master, replicas of it, and one `redis-sentinel` watching them
/// with quorum 1 and short timeouts (a dead master is failed over within a
/// few seconds). Stopped when released.
public final class RedisSentinelCluster: @unchecked Sendable {
    public static let masterName = "casfs"

    /// Servers by the order they were started: the first was the master.
    public let servers: [RedisServer]
    public let sentinelPort: Int
    public let directory: URL
    private var sentinel: Process?
    private let executable: String

    /// Replication settings for quick, diskless full syncs.
    static let replicationArguments = [
        "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
        "--repl-ping-replica-period", "1", "--repl-timeout", "5",
    ]

    /// `downAfterMilliseconds`: how long the sentinel waits before it calls
    /// an unresponsive server down (a master that is down is failed over).
    public init(replicas: Int = 1, downAfterMilliseconds: Int = 1000, failoverTimeoutMilliseconds: Int = 2000) throws {
        guard let exe = RedisServer.findExecutable("redis-sentinel") else {
            throw TestSupportError("redis-sentinel not found on PATH; install it (apt-get install redis-sentinel, or scripts/install-deps) to run these tests")
        }
        executable = exe
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("casfs-sentinel-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let master = try RedisServer.tcp(arguments: RedisSentinelCluster.replicationArguments)
        var all = [master]
        for _ in 0..<replicas {
            all.append(try RedisServer.tcp(arguments: RedisSentinelCluster.replicationArguments + [
                "--replicaof", "127.0.0.1", String(master.port!),
            ]))
        }
        servers = all
        sentinelPort = try RedisServer.freePort()
        try RedisSentinelCluster.waitForReplication(master: master.port!, replicas: all.dropFirst().map { $0.port! })
        let conf = """
            port \(sentinelPort)
            bind 127.0.0.1
            dir \(directory.path)
            logfile \(directory.appendingPathComponent("sentinel.log").path)
            daemonize no
            sentinel monitor \(RedisSentinelCluster.masterName) 127.0.0.1 \(master.port!) 1
            sentinel down-after-milliseconds \(RedisSentinelCluster.masterName) \(downAfterMilliseconds)
            sentinel failover-timeout \(RedisSentinelCluster.masterName) \(failoverTimeoutMilliseconds)
            sentinel parallel-syncs \(RedisSentinelCluster.masterName) 1

            """
        let confPath = directory.appendingPathComponent("sentinel.conf").path
        try conf.write(toFile: confPath, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = [confPath]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        sentinel = p
        try RedisSentinelCluster.poll("the sentinel to see \(replicas) replicas") {
            guard p.isRunning else { throw TestSupportError("redis-sentinel exited:\n\(self.sentinelLog)") }
            let r = try self.sentinelCommand(["SENTINEL", "REPLICAS", .string(RedisSentinelCluster.masterName)])
            guard case .array(let items) = r, items.count == replicas else { return false }
            // Each replica answered the sentinel's INFO: it is known up and linked.
            return items.allSatisfy { item in
                guard case .array(let kv) = item else { return false }
                let pairs = stride(from: 0, to: kv.count - 1, by: 2).map { (kv[$0].string, kv[$0 + 1].string) }
                return pairs.contains { $0 == ("master-link-status", "ok") } && pairs.contains { $0.0 == "flags" && $0.1 == "slave" }
            }
        }
    }

    deinit {
        if let p = sentinel, p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
        }
        for s in servers { s.stop() }
        try? FileManager.default.removeItem(at: directory)
    }

    public var sentinelAddress: RedisHostPort { RedisHostPort(host: "127.0.0.1", port: sentinelPort) }

    /// A client configuration that finds the master through the sentinel.
    public func config(
        commandTimeout: Double = 2, connectTimeout: Double = 1, retries: Int = 3,
        durableReplicas: Int? = nil, durableTimeout: Double = 2,
        durableShortfall: RedisDurableShortfall = .acceptIfReplicasDown, readFromReplicas: Bool = false
    ) -> RedisConfig {
        RedisConfig(
            host: "127.0.0.1", port: sentinelPort,
            connectTimeout: connectTimeout, commandTimeout: commandTimeout, maxConnections: 8,
            minBackoff: 0.02, maxBackoff: 0.2,
            sentinelMasterName: RedisSentinelCluster.masterName,
            retries: retries,
            durableReplicas: durableReplicas, durableTimeout: durableTimeout, durableShortfall: durableShortfall,
            readFromReplicas: readFromReplicas)
    }

    /// The server at `port`.
    public func server(port: Int) -> RedisServer? { servers.first { $0.port == port } }

    /// The master's port, as the sentinel names it now.
    public func masterPort() throws -> Int {
        let r = try sentinelCommand(["SENTINEL", "get-master-addr-by-name", .string(RedisSentinelCluster.masterName)])
        guard case .array(let parts) = r, parts.count == 2, let p = parts[1].string.flatMap({ Int($0) }) else {
            throw TestSupportError("unexpected get-master-addr-by-name reply \(r)")
        }
        return p
    }

    /// Asks the sentinel for a failover (retrying while it has no good replica yet).
    public func failover() throws {
        try RedisSentinelCluster.poll("the sentinel to accept SENTINEL FAILOVER") {
            let r = try self.sentinelCommand(["SENTINEL", "FAILOVER", .string(RedisSentinelCluster.masterName)])
            return r == .status("OK")
        }
    }

    /// Waits until the sentinel names the server at `port` as master, it
    /// says it is one, and every other running server is its replica with
    /// the link up.
    public func waitForMaster(port: Int, limit: Double = 90) throws {
        try RedisSentinelCluster.poll("127.0.0.1:\(port) to be the master with its replicas linked", limit: limit) {
            guard try self.masterPort() == port, try RedisSentinelCluster.info(port)["role"] == "master" else { return false }
            for s in self.servers where s.port != port && s.pid != nil {
                let i = try RedisSentinelCluster.info(s.port!)
                guard i["role"] == "slave", i["master_port"] == String(port), i["master_link_status"] == "up" else { return false }
            }
            return true
        }
    }

    /// Flags the sentinel has for the replica at `port` (empty when it does not list it).
    public func replicaFlags(port: Int) throws -> Set<String> {
        let r = try sentinelCommand(["SENTINEL", "REPLICAS", .string(RedisSentinelCluster.masterName)])
        guard case .array(let items) = r else { return [] }
        for item in items {
            guard case .array(let kv) = item else { continue }
            var f: [String: String] = [:]
            var i = 0
            while i + 1 < kv.count {
                if let k = kv[i].string, let v = kv[i + 1].string { f[k] = v }
                i += 2
            }
            if f["port"] == String(port) { return Set((f["flags"] ?? "").split(separator: ",").map(String.init)) }
        }
        return []
    }

    /// One command to the sentinel.
    public func sentinelCommand(_ args: [RedisArgument]) throws -> RedisReply {
        let pool = RedisPool(RedisConfig(port: sentinelPort, connectTimeout: 1, commandTimeout: 2, maxConnections: 1, retries: 0))
        defer { pool.close() }
        return try pool.command(args)
    }

    public var sentinelLog: String {
        (try? String(contentsOfFile: directory.appendingPathComponent("sentinel.log").path, encoding: .utf8)) ?? ""
    }

    /// `INFO replication` of the server at `port` (plain, no sentinel).
    public static func info(_ port: Int) throws -> [String: String] {
        let pool = RedisPool(RedisConfig(port: port, connectTimeout: 1, commandTimeout: 2, maxConnections: 1, retries: 0))
        defer { pool.close() }
        let text = try pool.command("INFO", "replication").string ?? ""
        var out: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) {
            if let colon = line.firstIndex(of: ":") {
                out[String(line[..<colon])] = String(line[line.index(after: colon)...])
            }
        }
        return out
    }

    /// Waits until the replicas at `replicas` are linked to the master at
    /// `master` and acknowledge its writes (after a full sync the master
    /// streams to a replica only once it has heard an ACK from it, which can
    /// take a second).
    public static func waitForReplication(master: Int, replicas: [Int]) throws {
        try poll("the replicas to sync with the master") {
            try info(master)["connected_slaves"] == String(replicas.count)
                && replicas.allSatisfy { try info($0)["master_link_status"] == "up" }
        }
        let pool = RedisPool(RedisConfig(port: master, connectTimeout: 1, commandTimeout: 2, maxConnections: 1, retries: 0))
        defer { pool.close() }
        try poll("the replicas to acknowledge writes") {
            let r = try pool.pipeline([["SET", "casfs-test-probe", "1"], ["WAIT", .integer(Int64(replicas.count)), 100], ["DEL", "casfs-test-probe"]])
            return r[1] == .integer(Int64(replicas.count))
        }
    }

    /// Calls `check` every 100 ms until it returns true (errors count as
    /// false); throws after `limit` seconds, naming `what` and the last error.
    public static func poll(_ what: String, limit: Double = 60, _ check: () throws -> Bool) throws {
        let deadline = Date().addingTimeInterval(limit)
        var last: Error?
        while Date() < deadline {
            do {
                if try check() { return }
            } catch {
                last = error
            }
            usleep(100_000)
        }
        throw TestSupportError("gave up waiting \(Int(limit)) s for \(what); last error: \(last.map { "\($0)" } ?? "none")")
    }
}
