import Dispatch
import Foundation
import Logging
import Synchronization

private let log = Logger(label: "casfs.redis")

/// Where a pool's connections go, as `RedisConfig` says: a fixed address, the
/// first target of a DNS SRV record, or the master (or a replica) that
/// Redis Sentinel names. With sentinels, every new connection asks them for
/// the master, as redis-py does. SRV records and the replica chosen for
/// reads are remembered until the pool calls `forget…` after a failure (as
/// BuildGrid resolves the record again before each retry); one lookup runs
/// at a time and callers arriving meanwhile share its result.
final class RedisTopology: Sendable {
    let config: RedisConfig
    let sentinel: RedisSentinel?
    private let resolver: DNSSRVResolver?
    private let lookups = NSLock()
    private let cache = Mutex(Cache())

    private struct Cache {
        /// Targets of the SRV record (servers or sentinels).
        var srv: [RedisHostPort]?
        var lastSRV: [RedisHostPort] = []
        var lastMaster: RedisEndpoint?
        /// A replica for reads; `.some(nil)` when there is none (checked again after a while).
        var replica: RedisEndpoint??
        var replicaCheckedAt: UInt64 = 0
    }

    /// Seconds before "no replica is up" is checked again.
    static let noReplicaRecheck: Double = 10

    init(_ config: RedisConfig) {
        self.config = config
        if config.unixSocket == nil, let name = config.sentinelMasterName {
            sentinel = RedisSentinel(masterName: name, config: config)
        } else {
            sentinel = nil
        }
        if config.unixSocket == nil, config.dnsSRVRecord != nil {
            resolver = DNSSRVResolver(servers: config.dnsServers, timeout: config.connectTimeout)
        } else {
            resolver = nil
        }
    }

    /// The master (or the only server).
    func master() throws -> RedisEndpoint {
        if let path = config.unixSocket { return .unix(path) }
        let found: RedisEndpoint
        if let sentinel {
            let list = try lookingUp { try sentinelsLocked() }
            found = .tcp(try sentinel.masterAddress(list))
        } else if resolver != nil {
            found = .tcp(try lookingUp { try srvTargets()[0] })
        } else {
            return .tcp(RedisHostPort(host: config.host, port: config.port))
        }
        let previous = cache.withLock { c -> RedisEndpoint? in
            defer { c.lastMaster = found }
            return c.lastMaster
        }
        if let previous, previous != found {
            log.notice("redis master of \(config.endpoint) is now \(found) (was \(previous))")
        }
        return found
    }

    /// A replica to read from, chosen at random among those the sentinels do
    /// not flag down, or nil when reads go to the master (no sentinel,
    /// replica reads not enabled, or no replica up).
    func replica() throws -> RedisEndpoint? {
        guard config.readFromReplicas, let sentinel else { return nil }
        let now = DispatchTime.now().uptimeNanoseconds
        let fresh = { (c: Cache) -> RedisEndpoint?? in
            guard let r = c.replica else { return nil }
            if r == nil && now > c.replicaCheckedAt + UInt64(RedisTopology.noReplicaRecheck * 1e9) { return nil }
            return r
        }
        if let r = cache.withLock({ fresh($0) }) { return r }
        lookups.lock()
        defer { lookups.unlock() }
        if let r = cache.withLock({ fresh($0) }) { return r }
        let candidates = try sentinel.replicas(try sentinelsLocked()).filter(\.up)
        let chosen = candidates.randomElement().map { RedisEndpoint.tcp($0.address) }
        cache.withLock {
            $0.replica = .some(chosen)
            $0.replicaCheckedAt = now
        }
        return chosen
    }

    /// Forgets the replica chosen and the SRV records: the next connection
    /// looks them up again.
    func forgetMaster() {
        cache.withLock {
            $0.replica = nil
            $0.srv = nil
        }
    }

    /// Forgets the replica chosen for reads.
    func forgetReplica() {
        cache.withLock { $0.replica = nil }
    }

    /// Asks the sentinels whether `master` still is the master and how many
    /// replicas are up; nil without sentinels.
    func assess(master: RedisEndpoint) throws -> RedisSentinel.Assessment? {
        guard let sentinel, case .tcp(let address) = master else { return nil }
        return try sentinel.assess(master: address, try lookingUp { try sentinelsLocked() })
    }

    /// Runs `body` holding `lookups`.
    private func lookingUp<T>(_ body: () throws -> T) rethrows -> T {
        lookups.lock()
        defer { lookups.unlock() }
        return try body()
    }

    /// The sentinels to ask (called with `lookups` held): the SRV targets, or
    /// the configured list, or host and port.
    private func sentinelsLocked() throws -> [RedisHostPort] {
        if resolver != nil { return try srvTargets() }
        if !config.sentinels.isEmpty { return config.sentinels }
        return [RedisHostPort(host: config.host, port: config.port)]
    }

    /// The SRV record's targets in the order received (called with `lookups` held).
    /// When a new lookup fails, the targets of the last one that worked are used.
    private func srvTargets() throws -> [RedisHostPort] {
        if let t = cache.withLock({ $0.srv }) { return t }
        guard let resolver, let name = config.dnsSRVRecord else { return [] }
        do {
            let targets = try resolver.lookup(name).compactMap { r -> RedisHostPort? in
                r.port == 0 ? nil : RedisHostPort(host: r.target, port: Int(r.port))
            }
            guard !targets.isEmpty else { throw DNSSRVMessage.Failure("SRV record '\(name)' has no usable target") }
            cache.withLock {
                $0.srv = targets
                $0.lastSRV = targets
            }
            return targets
        } catch {
            let last = cache.withLock { $0.lastSRV }
            if !last.isEmpty {
                log.warning("\(error); using the targets found before: \(last.map(\.description).joined(separator: ", "))")
                return last
            }
            throw RedisError.connectionFailed("\(error)")
        }
    }
}
