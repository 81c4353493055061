import CASCore
import Foundation

/// A configuration file as plain values: what to build, not built yet.
/// `StackBuilder` makes the live storage stack from it.
public struct ConfigSpec: Sendable {
    /// The storage node the mount serves.
    public var storage: StorageNode
    public var mount: MountOptions
    /// The file it came from (for errors).
    public var source: String

    public init(storage: StorageNode, mount: MountOptions = MountOptions(), source: String = "<config>") {
        self.storage = storage
        self.mount = mount
        self.source = source
    }
}

/// One storage node of the configuration. Nodes reached through one YAML
/// anchor share an `id` and are built once.
public struct StorageNode: Sendable {
    public var id: Int
    /// Where it sits in the file (`storage.fallback`); names its metrics.
    public var path: String
    public var kind: Kind
    /// Its line in the file, when it came from one.
    public var line: Int?
    /// The lines of its keys' values, to name the right line in errors
    /// found while building.
    public var keyLines: [String: Int] = [:]

    public indirect enum Kind: Sendable {
        case disk(path: String)
        case memory(size: Int64)
        case withCache(WithCacheSpec)
        case redisIndex(storage: StorageNode, redis: RedisSpec, prefix: String?)
        case remote(RemoteSpec)
        case sharded(ShardedSpec)
        case replicated(ReplicatedSpec)
        case sizeDifferentiated(SizeDifferentiatedSpec)
    }

    public init(id: Int, path: String, kind: Kind, line: Int? = nil) {
        self.id = id
        self.path = path
        self.kind = kind
        self.line = line
    }
}

public struct WithCacheSpec: Sendable {
    /// BuildGrid's default.
    public static let defaultWriterThreads = 20

    public var cache: StorageNode
    public var fallback: StorageNode
    public var deferFallbackWrites = false
    public var fallbackWriterThreads = WithCacheSpec.defaultWriterThreads
    /// Where deferred writes are journaled (required with a cache that is
    /// not a disk store; else inside the cache's directory).
    public var journal: String?

    public init(cache: StorageNode, fallback: StorageNode) {
        self.cache = cache
        self.fallback = fallback
    }
}

/// A `!sharded-storage`: named shards, chosen per blob as BuildGrid does.
public struct ShardedSpec: Sendable {
    /// BuildGrid's default: shard calls of a bulk operation run one by one.
    public static let defaultThreadPoolSize = 0

    public struct Shard: Sendable {
        public var name: String
        public var storage: StorageNode
        public init(name: String, storage: StorageNode) {
            self.name = name
            self.storage = storage
        }
    }

    public var shards: [Shard]
    public var threadPoolSize = ShardedSpec.defaultThreadPoolSize

    public init(shards: [Shard]) { self.shards = shards }
}

/// A `!replicated-storage`: every blob in all of `storages`.
public struct ReplicatedSpec: Sendable {
    /// BuildGrid's defaults: no background replication, one thread for it,
    /// reads repair the replicas that lack the blob.
    public static let defaultReplicationQueueSize = 0
    public static let defaultReplicationThreads = 1
    public static let defaultReadReplication = true

    public var storages: [StorageNode]
    public var replicationQueueSize = ReplicatedSpec.defaultReplicationQueueSize
    public var replicationThreads = ReplicatedSpec.defaultReplicationThreads
    public var readReplication = ReplicatedSpec.defaultReadReplication

    public init(storages: [StorageNode]) { self.storages = storages }
}

/// A `!size-differentiated-storage`: blobs placed by size.
public struct SizeDifferentiatedSpec: Sendable {
    /// BuildGrid's default: per-storage calls of a bulk operation run one by one.
    public static let defaultThreadPoolSize = 0

    public struct Tier: Sendable {
        /// Blobs strictly smaller than this may go here.
        public var maxSize: Int64
        public var storage: StorageNode
        public init(maxSize: Int64, storage: StorageNode) {
            self.maxSize = maxSize
            self.storage = storage
        }
    }

    public var tiers: [Tier]
    public var fallback: StorageNode
    public var threadPoolSize = SizeDifferentiatedSpec.defaultThreadPoolSize

    public init(tiers: [Tier], fallback: StorageNode) {
        self.tiers = tiers
        self.fallback = fallback
    }
}

/// A `!redis-connection`. Nodes reached through one anchor share an `id`.
public struct RedisSpec: Sendable {
    /// BuildGrid's default number of retries after a connection error.
    public static let defaultRetries = 3

    public var id: Int
    public var host: String?
    public var port: Int?
    public var unixSocket: String?
    public var password: String?
    public var db = 0
    public var connectTimeout: Double?
    public var commandTimeout: Double?
    public var maxConnections: Int?
    public var retries = RedisSpec.defaultRetries
    /// Redis Sentinel: the master's name, and the sentinels (host/port, or
    /// `sentinels:`, or every target of `dns-srv-record`).
    public var sentinelMasterName: String?
    public var sentinels: [String] = []
    public var dnsSRVRecord: String?
    public var dnsServers: [String] = []
    /// Replicas an index write waits for (`WAIT`); nil: 1 with Sentinel, else 0.
    public var durableReplicas: Int?
    public var durableTimeout: Double?
    public var durableShortfall: String?
    public var readFromReplicas = false
    /// Where it sits in the file (`storage.redis`) and the lines of its
    /// keys' values, to name them in errors found while building.
    public var path = "redis"
    public var keyLines: [String: Int] = [:]

    public init(id: Int) { self.id = id }
}

/// A `!remote-storage`.
public struct RemoteSpec: Sendable {
    public static let defaultRequestTimeout: Double = 60
    public static let defaultRetries = 3

    /// BuildGrid's default, in seconds.
    public static let defaultMaxBackoff: Double = 64

    public var url: String
    public var instanceName = ""
    public var requestTimeout = RemoteSpec.defaultRequestTimeout
    public var retries = RemoteSpec.defaultRetries
    public var maxBackoff = RemoteSpec.defaultMaxBackoff
    /// BuildGrid's `credentials:` keys, as given.
    public var tlsServerCert: String?
    public var tlsClientKey: String?
    public var tlsClientCert: String?
    public var authToken: String?
    public var tokenRefreshSeconds: Double?
    /// BuildGrid's `channel-options:` (names with dashes), values as text.
    public var channelOptions: [String: String] = [:]

    public init(url: String) { self.url = url }
}
