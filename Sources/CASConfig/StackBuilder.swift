import CASCore
import CASStorage
import Foundation
import Redis
import RemoteCAS

/// A live storage stack, built from a `ConfigSpec`.
public struct StorageStack: Sendable {
    /// The top of the stack: what the mount and the commands use.
    public var storage: any Storage
    /// The index found in the stack (for listing, totals, access times).
    public var index: RedisIndex?
    /// Refreshes access times of read blobs in the index (nil without one).
    public var accessTimes: AccessTimeBatcher?
    public var metrics: Metrics
    public var mount: MountOptions
    /// Each configured node as built (before any verifying decorator), by
    /// its place in the file (`storage.fallback`).
    public var nodes: [String: any Storage]
    /// Every `!disk-storage` of the stack, with its index and the storages
    /// a damaged copy can be repaired from (`casfs scrub`).
    public var scrubTargets: [ScrubTarget] = []

    /// Stops the access-time recorder (flushing it), then the storage.
    public func stop() throws {
        accessTimes?.stop()
        try storage.stop()
    }
}

/// Makes live objects from a `ConfigSpec`. The stack it builds, top down:
/// - `WriteCheckingStorage`: every write is checked against its digest;
/// - `ExistenceCachingStorage`: blobs found present are known so for a while;
/// - `EmptyBlobStorage`: the empty blob, answered once for all below;
/// - `PrefetchingStorage` (with `tree-prefetch`, when a `!with-cache-storage`
///   is there to bring blobs into): bulk hints for trees;
/// - the configured nodes, with a `VerifyingStorage` put around each node
///   whose bytes casfs has not checked: every `!disk-storage` and
///   `!remote-storage`, and every `!redis-index` (in place of its store).
///   The composites (`!sharded-storage`, `!replicated-storage`,
///   `!size-differentiated-storage`) sit above such checked children, so a
///   replica with a bad copy is passed over rather than failing the read.
public final class StackBuilder {
    public let metrics: Metrics
    private var built: [Int: any Storage] = [:]
    private var nodes: [String: any Storage] = [:]
    private var pools: [Int: RedisPool] = [:]
    private var indexes: [RedisIndex] = []
    private var disks: [Int: DiskStorage] = [:]
    private var indexByNode: [Int: RedisIndex] = [:]
    /// A `!with-cache-storage` was built (prefetching can fill it).
    private var hasCache = false
    /// Index nodes whose Redis holds nothing else (casfs's private Redis).
    private let exclusiveRedis: Set<Int>
    private var source = "<config>"

    public init(metrics: Metrics = Metrics(), exclusiveRedis: Set<Int> = []) {
        self.metrics = metrics
        self.exclusiveRedis = exclusiveRedis
    }

    public func build(_ spec: ConfigSpec, withAccessTimes: Bool = true) throws -> StorageStack {
        source = spec.source
        var storage = try node(spec.storage, verified: false)
        // Hints only pay where a cache can be filled ahead of the reads.
        if spec.mount.treePrefetch && hasCache { storage = PrefetchingStorage(storage) }
        let top = MetricScope(metrics, node: "storage")
        storage = WriteCheckingStorage(ExistenceCachingStorage(EmptyBlobStorage(storage), metrics: top), metrics: top)
        let index = indexes.first
        let batcher = withAccessTimes ? index.map {
            AccessTimeBatcher(index: $0, metrics: MetricScope(metrics, node: spec.storage.path))
        } : nil
        var stack = StorageStack(storage: storage, index: index, accessTimes: batcher, metrics: metrics, mount: spec.mount,
                                 nodes: nodes)
        var targets: [ScrubTarget] = []
        scrubTargets(spec.storage, index: nil, sources: [], into: &targets)
        stack.scrubTargets = targets
        return stack
    }

    /// The disk stores under `n`: each with the index right above it and
    /// the storages that can supply a good copy (a cache's fallback; the
    /// other replicas), as built (each checks what it returns).
    private func scrubTargets(_ n: StorageNode, index: RedisIndex?, sources: [(name: String, storage: any Storage)],
                              into out: inout [ScrubTarget]) {
        func built(_ m: StorageNode) -> [(name: String, storage: any Storage)] {
            self.built[m.id].map { [(m.path, $0)] } ?? []
        }
        switch n.kind {
        case .disk:
            guard let disk = disks[n.id], !out.contains(where: { $0.disk === disk }) else { return }
            out.append(ScrubTarget(name: n.path, disk: disk, index: index, repairSources: sources))
        case .memory, .remote:
            return
        case .withCache(let w):
            scrubTargets(w.cache, index: nil, sources: sources + built(w.fallback), into: &out)
            scrubTargets(w.fallback, index: nil, sources: sources, into: &out)
        case .redisIndex(let inner, _, _):
            scrubTargets(inner, index: indexByNode[n.id], sources: sources, into: &out)
        case .sharded(let sh):
            for s in sh.shards { scrubTargets(s.storage, index: index, sources: sources, into: &out) }
        case .replicated(let r):
            for (i, s) in r.storages.enumerated() {
                let others = r.storages.enumerated().filter { $0.offset != i }.flatMap { built($0.element) }
                scrubTargets(s, index: index, sources: sources + others, into: &out)
            }
        case .sizeDifferentiated(let sd):
            for t in sd.tiers { scrubTargets(t.storage, index: index, sources: sources, into: &out) }
            scrubTargets(sd.fallback, index: index, sources: sources, into: &out)
        }
    }

    /// Builds a node once (aliases share it). `verified`: a node above
    /// already checks what this one returns.
    private func node(_ n: StorageNode, verified: Bool) throws -> any Storage {
        if let s = built[n.id] { return s }
        let scope = MetricScope(metrics, node: n.path)
        let s: any Storage
        switch n.kind {
        case .disk(let path):
            let disk = try located(n, "path") { try DiskStorage(root: path, metrics: scope) }
            nodes[n.path] = disk
            disks[n.id] = disk
            s = verified ? disk : VerifyingStorage(disk, sourceName: "\(n.path) (disk \(path))", metrics: scope)
        case .memory(let size):
            s = MemoryStorage(maxBytes: size, metrics: scope)
            nodes[n.path] = s
        case .withCache(let w):
            let cache = try node(w.cache, verified: false)
            let fallback = try node(w.fallback, verified: false)
            var journal: DeferredWriteJournal?
            if w.deferFallbackWrites {
                var dir = w.journal
                if dir == nil, case .disk(let cachePath) = w.cache.kind { dir = cachePath + "/casfs-journal" }
                guard let dir else { throw ConfigError(source: source, line: n.line, key: n.path, message: "defer-fallback-writes needs `journal:`") }
                journal = try located(n, "journal") {
                    try DeferredWriteJournal(directory: dir, threads: w.fallbackWriterThreads, metrics: scope)
                }
            }
            s = WithCacheStorage(cache: cache, fallback: fallback, journal: journal, metrics: scope)
            hasCache = true
            nodes[n.path] = s
        case .redisIndex(let inner, let redisSpec, let prefix):
            let store = try node(inner, verified: true)
            let index = try located(n, "prefix") {
                try RedisIndex(redis: try pool(redisSpec), storage: store, prefix: prefix,
                               exclusive: exclusiveRedis.contains(redisSpec.id), metrics: scope)
            }
            indexes.append(index)
            indexByNode[n.id] = index
            nodes[n.path] = index
            s = verified ? index : VerifyingStorage(index, sourceName: "\(n.path) (redis index over \(inner.path))", metrics: scope)
        case .remote(let r):
            let remote = try located(n, "url") {
                do {
                    return try RemoteStorage(
                        url: r.url, instanceName: r.instanceName, requestTimeout: r.requestTimeout, retries: r.retries,
                        maxBackoff: r.maxBackoff,
                        credentials: RemoteCredentials(tlsServerCert: r.tlsServerCert, tlsClientKey: r.tlsClientKey,
                                                       tlsClientCert: r.tlsClientCert, authToken: r.authToken,
                                                       tokenRefreshSeconds: r.tokenRefreshSeconds),
                        channelOptions: r.channelOptions, metrics: scope)
                } catch let e as RemoteSetupError {
                    let line = n.keyLines[e.key] ?? n.keyLines[String(e.key.prefix { $0 != "." })] ?? n.line
                    throw ConfigError(source: source, line: line,
                                      key: "\(n.path).\(e.key)", message: e.message)
                }
            }
            nodes[n.path] = remote
            s = verified ? remote : VerifyingStorage(remote, sourceName: "\(n.path) (remote \(r.url))", metrics: scope)
        case .sharded(let sh):
            // Composites hold verified children: each leaf checks its own bytes.
            let shards = try sh.shards.map { ShardedStorage.Shard(name: $0.name, storage: try node($0.storage, verified: false)) }
            s = try located(n, "shards") { try ShardedStorage(shards: shards, threadPoolSize: sh.threadPoolSize) }
            nodes[n.path] = s
        case .replicated(let r):
            let replicas = try r.storages.map { try node($0, verified: false) }
            s = try located(n, "storages") {
                try ReplicatedStorage(replicas: replicas, readReplication: r.readReplication,
                                      replicationQueueSize: r.replicationQueueSize,
                                      replicationThreads: r.replicationThreads, metrics: scope)
            }
            nodes[n.path] = s
        case .sizeDifferentiated(let sd):
            let tiers = try sd.tiers.map { SizeDifferentiatedStorage.Tier(maxSize: $0.maxSize, storage: try node($0.storage, verified: false)) }
            s = SizeDifferentiatedStorage(tiers: tiers, fallback: try node(sd.fallback, verified: false),
                                          threadPoolSize: sd.threadPoolSize)
            nodes[n.path] = s
        }
        built[n.id] = s
        return s
    }

    private func pool(_ r: RedisSpec) throws -> RedisPool {
        if let p = pools[r.id] { return p }
        var c = RedisConfig()
        if let h = r.host { c.host = h }
        if let p = r.port { c.port = p }
        c.unixSocket = r.unixSocket
        c.password = r.password
        c.db = r.db
        if let t = r.connectTimeout { c.connectTimeout = t }
        if let t = r.commandTimeout { c.commandTimeout = t }
        if let n = r.maxConnections { c.maxConnections = n }
        c.retries = r.retries
        c.sentinelMasterName = r.sentinelMasterName
        c.dnsSRVRecord = r.dnsSRVRecord
        func hostPorts(_ list: [String], _ name: String, defaultPort: Int) throws -> [RedisHostPort] {
            try list.map { text in
                guard let hp = RedisHostPort(parsing: text, defaultPort: defaultPort) else {
                    throw ConfigError(source: source, line: r.keyLines[name], key: "\(r.path).\(name)", message: "'\(text)' is not host:port")
                }
                return hp
            }
        }
        c.sentinels = try hostPorts(r.sentinels, "sentinels", defaultPort: 26379)
        c.dnsServers = try hostPorts(r.dnsServers, "dns-servers", defaultPort: 53)
        c.durableReplicas = r.durableReplicas
        if let t = r.durableTimeout { c.durableTimeout = t }
        if let v = r.durableShortfall, let s = RedisDurableShortfall(rawValue: v) { c.durableShortfall = s }
        c.readFromReplicas = r.readFromReplicas
        if let host = r.host, r.sentinelMasterName != nil, r.sentinels.isEmpty {
            // As BuildGrid: host/port name the sentinel.
            c.sentinels = [RedisHostPort(host: host, port: r.port ?? 26379)]
        }
        let p = RedisPool(c)
        pools[r.id] = p
        return p
    }

    /// Runs `make`, turning its failure into an error naming the node's key.
    private func located<T>(_ n: StorageNode, _ key: String, _ make: () throws -> T) throws -> T {
        do { return try make() } catch let e as ConfigError { throw e } catch {
            throw ConfigError(source: source, line: n.keyLines[key] ?? n.line, key: "\(n.path).\(key)", message: "\(error)")
        }
    }
}
