import Synchronization

/// Asks Redis Sentinel about one monitored master: where it is, which
/// replicas it has and in what state. Each question opens a short
/// connection to a sentinel (no AUTH, no SELECT: BuildGrid sends the
/// password to the servers only), trying the sentinels in turn, the one
/// that answered last first.
final class RedisSentinel: Sendable {
    let masterName: String
    private let config: RedisConfig
    private let preferred = Mutex<RedisHostPort?>(nil)

    init(masterName: String, config: RedisConfig) {
        self.masterName = masterName
        self.config = config
    }

    /// A replica as a sentinel sees it.
    struct Replica: Sendable, Equatable {
        var address: RedisHostPort
        /// Not flagged down or disconnected by the sentinel: it could be promoted.
        var up: Bool
    }

    /// What a sentinel says about the master a connection goes to.
    struct Assessment: Sendable, Equatable {
        /// The sentinel names another master, or a failover is under way.
        var moved: Bool
        /// Replicas that are up (could be promoted).
        var replicasUp: Int
    }

    /// The master's address (`SENTINEL get-master-addr-by-name`).
    func masterAddress(_ sentinels: [RedisHostPort]) throws -> RedisHostPort {
        let r = try ask(sentinels, [["SENTINEL", "get-master-addr-by-name", .string(masterName)]]) { replies in
            RedisSentinel.address(replies[0]) == nil ? "does not know a master named '\(masterName)' (\(replies[0]))" : nil
        }
        return RedisSentinel.address(r[0])!
    }

    /// The replicas of the master (`SENTINEL REPLICAS`).
    func replicas(_ sentinels: [RedisHostPort]) throws -> [Replica] {
        let r = try ask(sentinels, [["SENTINEL", "REPLICAS", .string(masterName)]]) { replies in
            if case .array = replies[0] { return nil }
            return "answered \(replies[0])"
        }
        return RedisSentinel.replicas(r[0])
    }

    /// Whether `master` is still the master, and how many replicas are up.
    func assess(master: RedisHostPort, _ sentinels: [RedisHostPort]) throws -> Assessment {
        let r = try ask(sentinels, [
            ["SENTINEL", "get-master-addr-by-name", .string(masterName)],
            ["SENTINEL", "MASTER", .string(masterName)],
            ["SENTINEL", "REPLICAS", .string(masterName)],
        ]) { replies in
            if RedisSentinel.address(replies[0]) == nil { return "does not know a master named '\(masterName)'" }
            guard case .array = replies[1], case .array = replies[2] else { return "answered \(replies[1]), \(replies[2])" }
            return nil
        }
        let current = RedisSentinel.address(r[0])!
        let flags = RedisSentinel.flags(RedisSentinel.fields(r[1]))
        let failingOver = !flags.isDisjoint(with: ["failover_in_progress", "s_down", "o_down"])
        let up = RedisSentinel.replicas(r[2]).filter(\.up).count
        return Assessment(moved: current != master || failingOver, replicasUp: up)
    }

    /// Runs `commands` on the first sentinel whose replies `problem` finds
    /// nothing wrong with (nil); that sentinel is asked first next time.
    private func ask(
        _ sentinels: [RedisHostPort], _ commands: [[RedisArgument]], problem: ([RedisReply]) -> String?
    ) throws -> [RedisReply] {
        guard !sentinels.isEmpty else { throw RedisError.connectionFailed("no sentinels configured for '\(masterName)'") }
        var order = sentinels
        if let p = preferred.withLock({ $0 }), let i = order.firstIndex(of: p), i > 0 {
            order.swapAt(0, i)
        }
        var failures: [String] = []
        for s in order {
            do {
                let conn = try RedisConnection(.tcp(s), config, authenticate: false)
                let replies = try conn.pipeline(commands)
                if let e = replies.first(where: \.isError) {
                    failures.append("\(s): \(e)")
                    continue
                }
                if let p = problem(replies) {
                    failures.append("\(s): \(p)")
                    continue
                }
                preferred.withLock { $0 = s }
                return replies
            } catch {
                failures.append("\(error)")
            }
        }
        throw RedisError.connectionFailed("no sentinel answered for '\(masterName)': \(failures.joined(separator: "; "))")
    }

    // MARK: - Replies

    /// `[ip, port]` with a valid port, or nil.
    static func address(_ r: RedisReply) -> RedisHostPort? {
        guard case .array(let parts) = r, parts.count == 2, let host = parts[0].string, !host.isEmpty,
              let portText = parts[1].string, let port = Int(portText), (1...65535).contains(port)
        else { return nil }
        return RedisHostPort(host: host, port: port)
    }

    /// A flat `[name, value, name, value, ...]` array as a dictionary.
    static func fields(_ r: RedisReply) -> [String: String] {
        guard case .array(let parts) = r else { return [:] }
        var out: [String: String] = [:]
        var i = 0
        while i + 1 < parts.count {
            if let k = parts[i].string, let v = parts[i + 1].string { out[k] = v }
            i += 2
        }
        return out
    }

    static func flags(_ fields: [String: String]) -> Set<String> {
        Set((fields["flags"] ?? "").split(separator: ",").map(String.init))
    }

    static func replicas(_ r: RedisReply) -> [Replica] {
        guard case .array(let items) = r else { return [] }
        return items.compactMap { item in
            let f = fields(item)
            guard let host = f["ip"], !host.isEmpty, let port = f["port"].flatMap({ Int($0) }), (1...65535).contains(port) else {
                return nil
            }
            let flags = flags(f)
            return Replica(
                address: RedisHostPort(host: host, port: port),
                up: flags.isDisjoint(with: ["s_down", "o_down", "disconnected"]))
        }
    }
}
