import CASConfig
import CASCore
import CASStorage
import Foundation

/// The storage stack a command works on: the one in `--config`, or the
/// zero-config default with its private Redis (started here when it is not
/// already running, and then stopped again by `close()`).
final class OpenStack {
    let config: CasfsConfig
    /// Set for the zero-config default.
    let privateRedis: PrivateRedis?
    /// True when this process started the private Redis and so must stop it.
    private let ownsRedis: Bool

    /// Opens the stack. `keepRedis`: the caller takes over the private Redis
    /// (the mount, which stops it at unmount) whether or not it was running.
    init(configPath: String?, keepRedis: Bool = false) throws {
        if let configPath {
            config = try CasfsConfig.load(path: configPath)
            privateRedis = nil
            ownsRedis = false
            return
        }
        let data = DefaultConfig.dataDirectory()
        let redis = DefaultConfig.privateRedis(dataDirectory: data)
        var started = false
        if !redis.isRunning() {
            try redis.start()
            started = true
        }
        do {
            config = try DefaultConfig.make(dataDirectory: data, redis: redis)
        } catch {
            if started { redis.stop() }
            throw error
        }
        privateRedis = redis
        ownsRedis = started || keepRedis
    }

    /// The Redis index of the stack, or an error naming what is missing.
    func redisIndex(for command: String) throws -> RedisIndex {
        guard let index = config.index as? RedisIndex else {
            throw CLIError("\(command) needs a !redis-index in the configuration")
        }
        return index
    }

    /// Stops the storage (draining deferred writes) and the private Redis if this process owns it.
    func close() {
        do { try config.storage.stop() } catch {
            FileHandle.standardError.write(Data("casfs: stopping storage: \(error)\n".utf8))
        }
        if ownsRedis { privateRedis?.stop() }
    }
}

/// A one-line error for the user; the command exits non-zero.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Prints `casfs: <error>` to stderr.
func printError(_ message: Any) {
    FileHandle.standardError.write(Data("casfs: \(message)\n".utf8))
}

/// Formats a byte count for people: `1.5 GiB`.
func humanBytes(_ n: Int64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var v = Double(n)
    var i = 0
    while abs(v) >= 1024 && i < units.count - 1 {
        v /= 1024
        i += 1
    }
    return i == 0 ? "\(n) B" : String(format: "%.1f %@", v, units[i])
}
