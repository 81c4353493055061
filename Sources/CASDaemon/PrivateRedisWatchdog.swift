import CASProcess
import Foundation
import Logging
import Synchronization

/// Keeps a zero-config mount's private Redis running: once a second it
/// looks whether the server's process (from its pid file) still exists, and
/// when it is gone (killed, crashed, OOM) starts it again in the same
/// directory, where it reloads its append-only file. A server that is only
/// slow or stopped (SIGSTOP) still exists and is left alone: two servers on
/// one append-only file would corrupt it.
public final class PrivateRedisWatchdog: Sendable {
    private let redis: PrivateRedis
    private let interval: Double
    private let log: Logger
    /// Called after each restart (the index may have lost recent entries).
    private let restarted: @Sendable () -> Void
    private let stopping = Mutex(false)
    private let wake = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)

    private init(redis: PrivateRedis, interval: Double, log: Logger, restarted: @escaping @Sendable () -> Void) {
        self.redis = redis
        self.interval = interval
        self.log = log
        self.restarted = restarted
    }

    /// Starts watching `redis` on a thread of its own.
    public static func start(_ redis: PrivateRedis, interval: Double = 1, log: Logger,
                      restarted: @escaping @Sendable () -> Void) -> PrivateRedisWatchdog {
        let w = PrivateRedisWatchdog(redis: redis, interval: interval, log: log, restarted: restarted)
        let t = Thread { w.watch() }
        t.name = "casfs-redis-watchdog"
        t.start()
        return w
    }

    /// Stops watching and waits for a restart under way to end, so that the
    /// caller may stop the server without it coming back.
    public func stop() {
        let first = stopping.withLock { s in
            defer { s = true }
            return !s
        }
        guard first else { return }
        wake.signal()
        finished.wait()
    }

    private func watch() {
        defer { finished.signal() }
        while wake.wait(timeout: .now() + interval) == .timedOut {
            if stopping.withLock({ $0 }) { return }
            if serverExists() { continue }
            restart()
        }
    }

    /// True while the server's process exists and is not a zombie; without a
    /// pid file, true while it answers on its socket.
    private func serverExists() -> Bool {
        guard let pid = redis.serverPID() else { return redis.isRunning() }
        return processIsAlive(pid)
    }

    private func restart() {
        let old = redis.serverPID().map { " (pid \($0))" } ?? ""
        log.warning("the private Redis\(old) is gone: starting it again in \(redis.directory)")
        do {
            try redis.start()
        } catch {
            log.error("restarting the private Redis failed (trying again in \(interval) s): \(error)")
            return
        }
        let now = redis.serverPID().map { " (pid \($0))" } ?? ""
        log.notice("the private Redis runs again\(now)")
        restarted()
    }
}
