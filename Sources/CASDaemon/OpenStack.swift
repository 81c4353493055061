import CASConfig
import CASCore
import CASStorage
import CLinux
import Foundation

/// The storage stack a command or a mount works on: the one in a config
/// file, or the zero-config default with its private Redis (started here
/// when it is not already running, and then stopped again by `close()`).
/// A zero-config mount also holds the data directory's mount lock.
public final class OpenStack: @unchecked Sendable {
    public let stack: StorageStack
    /// Set for the zero-config default.
    public let privateRedis: PrivateRedis?
    /// The zero-config data directory, for the default stack.
    public let dataDirectory: String?
    /// True when this process started the private Redis and so must stop it.
    private let ownsRedis: Bool
    /// The data directory's mount lock, held by a zero-config mount for its lifetime.
    private var mountLock: Int32 = -1

    public var storage: any Storage { stack.storage }
    public var index: RedisIndex? { stack.index }
    public var metrics: Metrics { stack.metrics }

    /// A stack built elsewhere (e.g. by `StackBuilder` from a spec): `close()` stops it.
    public init(stack: StorageStack) {
        self.stack = stack
        privateRedis = nil
        dataDirectory = nil
        ownsRedis = false
    }

    /// Opens the stack. `keepRedis`: the caller takes over the private Redis
    /// (the mount, which stops it at unmount) whether or not it was running.
    public init(configPath: String?, keepRedis: Bool = false, metrics: Metrics = Metrics()) throws {
        if let configPath {
            stack = try CasfsConfig.load(path: configPath, metrics: metrics)
            privateRedis = nil
            dataDirectory = nil
            ownsRedis = false
            return
        }
        let data = DefaultConfig.dataDirectory()
        try DefaultConfig.prepareDataDirectory(data)
        let redis = DefaultConfig.privateRedis(dataDirectory: data)
        if keepRedis {
            // One zero-config mount per data directory: it owns the private Redis.
            mountLock = try OpenStack.takeMountLock(data)
        }
        var started = false
        do {
            if !redis.isRunning() {
                try redis.start()
                started = true
            }
            stack = try DefaultConfig.make(dataDirectory: data, redis: redis, metrics: metrics)
        } catch {
            if started { redis.stop() }
            if mountLock >= 0 { Foundation.close(mountLock) }
            throw error
        }
        privateRedis = redis
        dataDirectory = data
        ownsRedis = started || keepRedis
    }

    /// Takes the data directory's mount lock. A mount that is going away (its
    /// daemon still flushing after the unmount) holds it for a moment: wait
    /// for it rather than fail.
    private static func takeMountLock(_ data: String) throws -> Int32 {
        let fd = Foundation.open(data + "/mount.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw DaemonError("cannot open \(data)/mount.lock: \(String(cString: strerror(errno)))") }
        let deadline = Date().addingTimeInterval(15)
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            // A serving mount records itself in the lock file: that one is
            // not going away. One that is starting, or going away (its
            // daemon still flushing after the unmount), has no record or a
            // record of a mount that is gone: wait for that one.
            var buf = [UInt8](repeating: 0, count: 2)
            let n = pread(fd, &buf, buf.count, 0)
            if n == 2 && buf == Array("-\n".utf8) {
                Foundation.close(fd)
                throw DaemonError("another casfs mount already serves the zero-config store in \(data), for casfs run")
            }
            if n > 0, let at = runningZeroConfigMount(dataDirectory: data) {
                Foundation.close(fd)
                throw DaemonError("another casfs mount already serves the zero-config store in \(data), at \(at)")
            }
            if Date() >= deadline {
                Foundation.close(fd)
                throw DaemonError("another casfs process holds the zero-config store in \(data) (\(data)/mount.lock) and did not let go within 15 s")
            }
            usleep(50_000)
        }
        return fd
    }

    /// For a zero-config mount: writes `mountpoint` into the mount lock it
    /// holds, where `runningZeroConfigMount` finds it (a temporary mount
    /// writes `-`: it serves, but is not for others to use). Nil for other stacks.
    public func mountPointRecorder(_ mountpoint: String?) -> (@Sendable () -> Void)? {
        guard mountLock >= 0 else { return nil }
        let fd = mountLock
        return {
            _ = ftruncate(fd, 0)
            let bytes = Array(((mountpoint ?? "-") + "\n").utf8)
            _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        }
    }

    /// Clears the mount point recorded by `mountPointRecorder`: the mount is
    /// gone, though this process still holds the lock while it finishes.
    public func withdrawMountPoint() {
        guard mountLock >= 0 else { return }
        _ = ftruncate(mountLock, 0)
    }

    /// The mount point of the zero-config mount serving `dataDirectory`, if
    /// one recorded it, still holds the lock and answers as a casfs mount.
    public static func runningZeroConfigMount(dataDirectory: String) -> String? {
        let fd = Foundation.open(dataDirectory + "/mount.lock", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { Foundation.close(fd) }
        var buf = [UInt8](repeating: 0, count: 4097)
        let n = read(fd, &buf, buf.count)
        // Empty when no mount runs (the mount clears it at unmount): nothing to probe.
        guard n > 1, n < buf.count, buf[n - 1] == UInt8(ascii: "\n") else { return nil }
        let path = String(decoding: buf[0..<(n - 1)], as: UTF8.self)
        guard path.hasPrefix("/"), MountTable.isMountPoint(path), MountTable.isCasfsMount(path) else { return nil }
        // A record left by a mount that did not stop cleanly, and another
        // casfs mount there now: nobody holds the lock.
        if flock(fd, LOCK_SH | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            return nil
        }
        return path
    }

    /// The Redis index of the stack, or an error naming what is missing.
    public func redisIndex(for command: String) throws -> RedisIndex {
        guard let index else {
            throw DaemonError("\(command) needs a !redis-index in the configuration")
        }
        return index
    }

    /// Stops the storage (draining deferred writes) and the private Redis if this process owns it.
    public func close() {
        do { try stack.stop() } catch {
            FileHandle.standardError.write(Data("casfs: stopping storage: \(error)\n".utf8))
        }
        guard ownsRedis, let redis = privateRedis else { return }
        if mountLock >= 0 {
            _ = ftruncate(mountLock, 0)
            redis.stop()
            Foundation.close(mountLock)
            return
        }
        // A command that started the Redis leaves it to a mount that began meanwhile.
        let lock = Foundation.open(redis.directory + "/../mount.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        defer { if lock >= 0 { Foundation.close(lock) } }
        if lock >= 0 && flock(lock, LOCK_EX | LOCK_NB) != 0 { return }
        redis.stop()
    }
}

/// A one-line error for the user.
public struct DaemonError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
