import Dispatch
import Logging
import Synchronization

private let log = Logger(label: "casfs.redis")

/// Durable pipelines end with `WAIT <n> <timeout>`: the master answers how
/// many replicas acknowledged the writes before it. Replication is
/// asynchronous, so without this a write acknowledged by a master that then
/// dies can be missing on the replica promoted in its place.
///
/// When fewer than n acknowledged, the replicas are checked (with the
/// sentinels; without, with the master's `ROLE`): if the master has moved
/// or is being failed over, the pipeline is retried on the new master; else
/// `RedisConfig.durableShortfall` decides. In the default policy a shortfall
/// is accepted only when the replicas that did not acknowledge are down (a
/// sentinel flags them down or disconnected, so none can be promoted); the
/// pool then remembers for a second that fewer replicas are up and waits
/// for those only (for none: no WAIT), so writes do not each stall for the
/// timeout while a replica is down.
final class RedisDurability: Sendable {
    /// Replicas wanted (0: durable pipelines send no WAIT).
    let wanted: Int
    /// The WAIT timeout, in milliseconds (at least 1: 0 would wait forever).
    let timeoutMilliseconds: Int64
    /// The same in seconds, added to the socket timeout of a durable pipeline.
    var timeoutSeconds: Double { Double(timeoutMilliseconds) / 1000 }
    let policy: RedisDurableShortfall
    private let topology: RedisTopology
    private let degraded = Mutex<Degraded?>(nil)

    /// Seconds a "fewer replicas are up" finding is trusted before it is checked again.
    static let recheck: Double = 1

    private struct Degraded {
        var endpoint: RedisEndpoint
        var up: Int
        var until: UInt64
    }

    enum Verdict {
        case accepted
        /// Send the pipeline again (to the master found anew).
        case retry(RedisError)
        case fail(RedisError)
    }

    init(_ config: RedisConfig, topology: RedisTopology) {
        wanted = config.effectiveDurableReplicas
        var seconds = config.durableTimeout
        if !seconds.isFinite || seconds < 0 { seconds = 2 }
        timeoutMilliseconds = max(1, Int64(min(seconds, 3600) * 1000))
        policy = config.durableShortfall
        self.topology = topology
    }

    func waitCommand(_ n: Int) -> [RedisArgument] {
        ["WAIT", .integer(Int64(n)), .integer(timeoutMilliseconds)]
    }

    /// Replicas to wait for on this connection now: `wanted`, or fewer while
    /// replicas are known to be down.
    func replicasToWaitFor(_ conn: RedisConnection) -> Int {
        guard wanted > 0 else { return 0 }
        guard let d = degraded.withLock({ $0 }), d.endpoint == conn.endpoint else { return wanted }
        let now = DispatchTime.now().uptimeNanoseconds
        if now < d.until { return min(wanted, d.up) }
        let a = try? assess(conn)
        if let a, !a.moved, a.replicasUp < wanted {
            degraded.withLock { $0 = Degraded(endpoint: conn.endpoint, up: a.replicasUp, until: RedisDurability.deadline()) }
            return a.replicasUp
        }
        degraded.withLock { $0 = nil }
        if let a, !a.moved { log.info("redis master \(conn.endpoint): \(a.replicasUp) replicas are up again; durable writes wait for \(wanted)") }
        return wanted
    }

    /// Judges the reply to `WAIT n`.
    func judge(_ reply: RedisReply, waitedFor n: Int, on conn: RedisConnection) -> Verdict {
        switch reply {
        case .integer(let acked) where acked >= Int64(n):
            return .accepted
        case .integer(let acked):
            return shortfall(acked: Int(clamping: max(0, acked)), on: conn)
        case .error(let m) where topology.sentinel != nil && m.contains("replica"):
            return .retry(.server("\(conn.endpoint): \(m)"))
        case .error(let m):
            return .fail(.notDurable("\(conn.endpoint): WAIT failed: \(m)"))
        default:
            return .fail(.unexpectedReply("\(conn.endpoint): WAIT answered \(reply)"))
        }
    }

    private func shortfall(acked: Int, on conn: RedisConnection) -> Verdict {
        let a: RedisSentinel.Assessment
        do {
            a = try assess(conn)
        } catch {
            return .fail(.notDurable("\(conn.endpoint): \(acked) of \(wanted) replicas acknowledged within \(timeoutMilliseconds) ms, and the replicas could not be checked: \(error)"))
        }
        if a.moved {
            return .retry(.notDurable("\(conn.endpoint) is no longer the master or is being failed over (\(acked) replicas acknowledged)"))
        }
        let text = "\(conn.endpoint): \(acked) of \(wanted) replicas acknowledged within \(timeoutMilliseconds) ms; \(a.replicasUp) up"
        let missingAreDown = acked >= min(a.replicasUp, wanted)
        switch policy {
        case .fail:
            return .fail(.notDurable(text))
        case .acceptIfReplicasDown:
            guard missingAreDown else { return .fail(.notDurable(text)) }
            enterDegraded(conn.endpoint, up: a.replicasUp)
            return .accepted
        case .accept:
            if missingAreDown {
                enterDegraded(conn.endpoint, up: a.replicasUp)
            } else {
                log.warning("\(text); accepted as configured")
            }
            return .accepted
        }
    }

    /// Replicas up, and whether the master moved: from the sentinels, or the master's own `ROLE`.
    private func assess(_ conn: RedisConnection) throws -> RedisSentinel.Assessment {
        if let a = try topology.assess(master: conn.endpoint) { return a }
        return RedisSentinel.Assessment(moved: false, replicasUp: try conn.connectedReplicas())
    }

    private func enterDegraded(_ endpoint: RedisEndpoint, up: Int) {
        let changed = degraded.withLock { d -> Bool in
            let changed = d == nil || d!.endpoint != endpoint || d!.up != up
            d = Degraded(endpoint: endpoint, up: up, until: RedisDurability.deadline())
            return changed
        }
        if changed {
            log.warning("redis master \(endpoint): only \(up) of \(wanted) replicas are up (the others are down); durable writes wait for \(up) until they are back")
        }
    }

    private static func deadline() -> UInt64 {
        DispatchTime.now().uptimeNanoseconds + UInt64(recheck * 1e9)
    }
}
