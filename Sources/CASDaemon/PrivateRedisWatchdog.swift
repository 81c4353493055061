import CASProcess
import Foundation
import Logging
import Synchronization

/// Keeps a zero-config mount's private Redis running. It watches the
/// server's process through a pidfd; only when that process has exited
/// (killed, crashed, OOM) and the directory's lock is free (no process of
/// the old server holds it any more) does it start a server again, in the
/// same directory, where it reloads its append-only file. A server that is
/// slow, stopped (SIGSTOP), loading its data (`-LOADING`, however long) or
/// unreachable (the daemon out of descriptors, a connect that times out)
/// still exists and is left alone, and when the lock cannot even be checked
/// nothing is started: two servers on one append-only file would corrupt it.
public final class PrivateRedisWatchdog: Sendable {
    private let redis: PrivateRedis
    private let interval: Double
    private let log: Logger
    /// Called after each restart (the index may have lost recent entries).
    private let restarted: @Sendable () -> Void
    private let stopping = Stopper()
    private let finished = DispatchSemaphore(value: 0)
    private let restarts = Atomic<Int>(0)

    /// How long a restarted server may take to answer at all (one that
    /// answers it is loading its data is waited for however long it loads).
    private let startTimeout: Double

    private init(redis: PrivateRedis, interval: Double, startTimeout: Double, log: Logger,
                 restarted: @escaping @Sendable () -> Void) {
        self.redis = redis
        self.interval = interval
        self.startTimeout = startTimeout
        self.log = log
        self.restarted = restarted
    }

    /// Starts watching `redis` on a thread of its own.
    public static func start(_ redis: PrivateRedis, interval: Double = 1, startTimeout: Double = 15, log: Logger,
                             restarted: @escaping @Sendable () -> Void) -> PrivateRedisWatchdog {
        let w = PrivateRedisWatchdog(redis: redis, interval: interval, startTimeout: startTimeout, log: log,
                                     restarted: restarted)
        let t = Thread { w.watch() }
        t.name = "casfs-redis-watchdog"
        t.start()
        return w
    }

    /// Servers started so far.
    public var restartCount: Int { restarts.load(ordering: .relaxed) }

    /// Stops watching and waits for a restart under way to end, so that the
    /// caller may stop the server without it coming back.
    public func stop() {
        guard !stopping.isStopped else { return }
        stopping.stop()
        finished.wait()
        finished.signal()
    }

    /// What the last tick found, so that each change is logged once.
    private enum Seen: Equatable {
        case serving, gone, heldByLeftovers, cannotCheck, failed
    }

    private func watch() {
        defer { finished.signal() }
        var seen = Seen.serving
        func note(_ now: Seen, _ message: @autoclosure () -> Logger.Message, level: Logger.Level = .warning) {
            if now != seen { log.log(level: level, message()) }
            seen = now
        }
        while !stopping.isStopped {
            if let server = redis.serverHandle() {
                // Wakes at once when the process exits; else once per interval to look at `stopping`.
                guard server.waitForExit(timeout: interval) else { continue }
                if stopping.isStopped { return }
                var status: Int32 = 0
                _ = waitpid(server.pid, &status, WNOHANG)  // ours to reap if it was our child
                note(.gone, "the private Redis (pid \(server.pid)) exited")
            } else {
                stopping.sleep(interval)
                if stopping.isStopped { return }
            }
            switch redis.tryLock() {
            case .held:
                // A process of the old server (or one starting) holds the directory: not a second one.
                if redis.serverHandle() == nil {
                    note(.heldByLeftovers, "the private Redis in \(redis.directory) is held by a process that is not serving yet (\(redis.lockFile)); waiting for it")
                }
            case .unknown(let e):
                note(.cannotCheck, "cannot check the private Redis's lock \(redis.lockFile): \(String(cString: strerror(e))); not starting a server until it can be checked", level: .error)
            case .taken(let fd):
                log.warning("the private Redis is gone: starting it again in \(redis.directory)")
                do {
                    try redis.launch(lock: fd, timeout: startTimeout, cancelled: { stopping.isStopped })
                } catch {
                    note(.failed, "restarting the private Redis failed (trying again in \(interval) s): \(error)", level: .error)
                    continue
                }
                restarts.add(1, ordering: .relaxed)
                let now = redis.serverHandle().map { " (pid \($0.pid))" } ?? ""
                log.notice("the private Redis runs again\(now)")
                seen = .serving
                restarted()
            }
        }
    }
}
