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

    /// The private Redis of a data directory.
    public static func privateRedis(dataDirectory: String) -> PrivateRedis {
        PrivateRedis(directory: dataDirectory + "/redis")
    }

    /// Builds the default stack over an already running private Redis. When the
    /// index is empty but the disk store holds blobs (the Redis data was lost),
    /// the index is rebuilt from the disk first.
    public static func make(dataDirectory: String, redis: PrivateRedis) throws -> CasfsConfig {
        let disk = try DiskStorage(root: dataDirectory)
        let pool = RedisPool(redis.config)
        let index = try RedisIndex(redis: pool, storage: disk)
        let rebuilt = try rebuildIfEmpty(index: index, disk: disk)
        if rebuilt > 0 {
            log.notice("the index was empty: re-indexed \(rebuilt) blobs found in \(dataDirectory)")
        }
        let storage = WithCacheStorage(cache: MemoryStorage(maxBytes: memoryCacheBytes), fallback: index)
        var mount = MountOptions()
        mount.writable = true
        return CasfsConfig(storage: storage, index: index, mount: mount)
    }

    /// Re-indexes every blob of `disk` when the index holds none. Returns how many were added.
    @discardableResult
    public static func rebuildIfEmpty(index: RedisIndex, disk: DiskStorage) throws -> Int {
        guard try index.blobCount() <= 0 else { return 0 }
        var batch: [Digest] = []
        var added = 0
        try disk.forEachBlob { d in
            batch.append(d)
            if batch.count == 1000 {
                added += try index.addToIndex(batch)
                batch.removeAll(keepingCapacity: true)
            }
        }
        if !batch.isEmpty { added += try index.addToIndex(batch) }
        return added
    }
}
