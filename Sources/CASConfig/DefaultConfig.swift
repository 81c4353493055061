import CASCore
import CASStorage
import Foundation
import Redis

/// The zero-config default: WithCache(memory LRU → RedisIndex(DiskStorage at
/// `$XDG_DATA_HOME/casfs`, else `~/.local/share/casfs`)), indexed by a private
/// Redis kept in `<data>/redis`.
public enum DefaultConfig {
    /// Size of the memory cache in front of the disk store.
    public static let memoryCacheBytes: Int64 = 256 << 20

    /// `$XDG_DATA_HOME/casfs`, else `~/.local/share/casfs`.
    public static func dataDirectory(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let xdg = environment["XDG_DATA_HOME"], xdg.hasPrefix("/") { return xdg + "/casfs" }
        let home = environment["HOME"] ?? NSHomeDirectory()
        return home + "/.local/share/casfs"
    }

    /// Creates the data directory private to its user (0700), or makes an
    /// existing one so.
    public static func prepareDataDirectory(_ dir: String) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        if chmod(dir, 0o700) != 0 {
            throw StorageError.posix("chmod 0700 \(dir)")
        }
    }

    /// Where the private Redis of a data directory keeps its files.
    public static func redisDirectory(dataDirectory: String) -> String {
        dataDirectory + "/redis"
    }

    /// The unix socket of the private Redis kept in `redisDirectory`.
    public static func redisSocket(redisDirectory: String) -> String {
        redisDirectory + "/redis.sock"
    }

    /// Client timeouts for the private Redis (seconds).
    public static let redisConnectTimeout = 2.0
    public static let redisCommandTimeout = 10.0

    /// The default stack as a specification, its index on the private
    /// Redis listening on `redisSocket`.
    public static func spec(dataDirectory: String, redisSocket: String) -> ConfigSpec {
        var redisSpec = RedisSpec(id: 1)
        redisSpec.unixSocket = redisSocket
        redisSpec.connectTimeout = redisConnectTimeout
        redisSpec.commandTimeout = redisCommandTimeout
        let disk = StorageNode(id: 2, path: "storage.fallback.storage", kind: .disk(path: dataDirectory))
        let index = StorageNode(id: 3, path: "storage.fallback", kind: .redisIndex(storage: disk, redis: redisSpec, prefix: nil))
        let memory = StorageNode(id: 4, path: "storage.cache", kind: .memory(size: memoryCacheBytes))
        let top = StorageNode(id: 5, path: "storage", kind: .withCache(WithCacheSpec(cache: memory, fallback: index)))
        var mount = MountOptions()
        mount.writable = true
        return ConfigSpec(storage: top, mount: mount, source: "zero-config default")
    }

    /// Builds the default stack over an already running private Redis on
    /// `redisSocket`. When the index is empty but the disk store holds blobs
    /// (the Redis data was lost), the index is rebuilt from the disk first.
    public static func make(dataDirectory: String, redisSocket: String, metrics: Metrics = Metrics()) throws -> StorageStack {
        let stack = try StackBuilder(metrics: metrics, exclusiveRedis: [1])
            .build(spec(dataDirectory: dataDirectory, redisSocket: redisSocket))
        if let index = stack.index, try index.blobCount() <= 0 {
            let report = try index.reconcile()
            if report.added > 0 {
                log.notice("the index was empty: re-indexed \(report.added) blobs found in \(dataDirectory)")
            }
        }
        return stack
    }
}
