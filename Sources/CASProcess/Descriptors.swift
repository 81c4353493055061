import Foundation
import Synchronization

/// This process's descriptors as a whole.
public enum Descriptors {
    /// The descriptors open now (from /proc/self/fd).
    public static func open() -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int32($0) }.sorted()
    }

    /// Sets close-on-exec on every open descriptor above stderr that lacks
    /// it, and returns how many it changed. For descriptors that libraries
    /// open without the flag (SwiftNIO's sockets and epoll descriptor, as of
    /// 2.101); children this process starts through `Spawn` get none of them
    /// either way (every descriptor not passed is closed in the child).
    @discardableResult
    public static func markAllCloseOnExec() -> Int {
        var changed = 0
        for fd in open() where fd > 2 {
            let flags = fcntl(fd, F_GETFD)
            if flags >= 0 && flags & FD_CLOEXEC == 0, fcntl(fd, F_SETFD, flags | FD_CLOEXEC) == 0 {
                changed += 1
            }
        }
        return changed
    }

    /// Raises the soft limit of open descriptors (RLIMIT_NOFILE) to the
    /// hard limit; returns the limits before and after (nil if they cannot
    /// be read or set). Children started through `Spawn` afterwards get the
    /// soft limit from before the raise: a program that uses select()
    /// cannot take descriptors above 1023, and one that closes every
    /// possible descriptor at start would loop up to the raised limit.
    @discardableResult
    public static func raiseLimitToHard() -> (before: UInt64, after: UInt64)? {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        let before = UInt64(limit.rlim_cur)
        guard limit.rlim_cur < limit.rlim_max else { return (before, before) }
        original.withLock { $0 = before }
        limit.rlim_cur = limit.rlim_max
        guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        return (before, UInt64(limit.rlim_cur))
    }

    /// Sets the soft limit back to what it was before `raiseLimitToHard`
    /// (if that raised it); children then inherit it as it is.
    public static func restoreLimit() {
        original.withLock { original in
            guard let value = original else { return }
            var limit = rlimit()
            guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
            limit.rlim_cur = rlim_t(value)
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 { original = nil }
        }
    }

    /// The soft limit before `raiseLimitToHard` raised it, if it did.
    private static let original = Mutex<UInt64?>(nil)

    /// The soft limit a child should start with: the original one while
    /// this process runs with a different one; nil when they are the same
    /// (the child inherits the right one).
    public static func limitForChildren() -> UInt64? {
        guard let original = original.withLock({ $0 }), let now = softLimit, now != original else { return nil }
        return original
    }

    /// The soft limit of open descriptors.
    public static var softLimit: UInt64? {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        return UInt64(limit.rlim_cur)
    }
}
