import CASCore
import Foundation
import Synchronization

/// Digests whose replicas are made consistent in the background by a fixed
/// set of threads. Bounded: when `capacity` digests wait, a new one is
/// dropped and counted (the next check that notices it queues it again). A
/// digest that already waits is not queued twice. Jobs run only between
/// `start` and `stop`; `stop` drops what has not begun.
final class ReplicationQueue: Sendable {
    let capacity: Int
    let threads: Int
    private let waiting = Mutex<Set<Digest>>([])
    private let jobs = Mutex<BackgroundJobs?>(nil)
    private let work: @Sendable (Digest) -> Void
    private let dropped: MetricCounter

    init(capacity: Int, threads: Int, metrics: MetricScope, work: @escaping @Sendable (Digest) -> Void) {
        self.capacity = max(1, capacity)
        self.threads = max(1, threads)
        self.work = work
        dropped = metrics.counter(MetricCatalog.replicationDropped)
        let queued = metrics.gauge(MetricCatalog.replicationQueued)
        metrics.metrics.onCollect { [weak self] in queued.set(Int64(self?.pending ?? 0)) }
    }

    /// Digests queued or being replicated.
    var pending: Int { waiting.withLock { $0.count } }

    func start() {
        jobs.withLock { j in
            if j == nil { j = BackgroundJobs(threads: threads, name: "casfs-replication") }
        }
    }

    /// Drops the jobs not yet begun; running ones finish.
    func stop() {
        let j = jobs.withLock { j in
            defer { j = nil }
            return j
        }
        j?.abandon()
        waiting.withLock { $0.removeAll() }
    }

    /// Queues `d`; false when it was dropped (full, or not started).
    @discardableResult
    func submit(_ d: Digest) -> Bool {
        guard let jobs = jobs.withLock({ $0 }) else { return false }
        let accepted: Bool? = waiting.withLock { w in
            if w.contains(d) { return nil }
            guard w.count < capacity else { return false }
            w.insert(d)
            return true
        }
        switch accepted {
        case nil:
            return true
        case false?:
            dropped.add()
            return false
        case true?:
            jobs.submit { [self] in
                work(d)
                _ = waiting.withLock { $0.remove(d) }
            }
            return true
        }
    }
}
