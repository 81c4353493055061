import CASCore
import Dispatch
import Foundation
import Logging
import Synchronization

private let accessLog = Logger(label: "casfs.access-time")

/// Collects the digests of opened blobs and refreshes their access time in the
/// index from a background thread, one pipelined `touch` per interval. A digest
/// refreshed recently is not refreshed again. `record` never does I/O.
public final class AccessTimeBatcher: Sendable {
    public let index: any BlobIndex
    /// Seconds between flushes.
    public let flushInterval: Double
    /// A digest refreshed less than this many seconds ago is not refreshed again.
    public let refreshAfter: Double
    /// Most digests waiting for a flush; more are dropped until the next flush.
    public let maxPending: Int

    private struct State {
        var pending: [Digest] = []
        var pendingSet = Set<Digest>()
        var lastTouched: [Digest: UInt64] = [:]
        var lastPrune: UInt64 = 0
        var stopped = false
        var failing = false
    }

    private let state = Mutex(State())
    private let flushLock = Mutex(())
    private let wake = DispatchSemaphore(value: 0)
    private let done = DispatchSemaphore(value: 0)
    private let flushes: MetricCounter
    private let touched: MetricCounter
    private let failures: MetricCounter

    public init(index: any BlobIndex, flushInterval: Double = 1, refreshAfter: Double = 60, maxPending: Int = 100_000,
                metrics: MetricScope = .standalone("index")) {
        self.index = index
        flushes = metrics.counter(MetricCatalog.accessFlushes)
        touched = metrics.counter(MetricCatalog.accessTouched)
        failures = metrics.counter(MetricCatalog.accessFailures)
        self.flushInterval = flushInterval
        self.refreshAfter = refreshAfter
        self.maxPending = maxPending
        let thread = Thread { [self] in run() }
        thread.name = "casfs-access-time"
        thread.start()
    }

    /// Notes that `digest` was accessed. Cheap, never blocks on I/O.
    public func record(_ digest: Digest) {
        let now = DispatchTime.now().uptimeNanoseconds
        let window = UInt64(refreshAfter * 1e9)
        state.withLock { s in
            if s.stopped || s.pendingSet.contains(digest) { return }
            if let t = s.lastTouched[digest], now &- t < window { return }
            guard s.pending.count < maxPending else { return }
            s.pending.append(digest)
            s.pendingSet.insert(digest)
        }
    }

    /// Sends what is pending now, on the caller's thread. Errors are logged.
    public func flush() {
        flushLock.withLock { _ in flushNow() }
    }

    /// Flushes what is pending and stops the background thread. Idempotent.
    public func stop() {
        let first = state.withLock { s -> Bool in
            defer { s.stopped = true }
            return !s.stopped
        }
        guard first else { return }
        wake.signal()
        done.wait()
    }

    deinit {
        // The thread holds a strong reference until it ends, so deinit runs only after stop().
    }

    private func run() {
        while true {
            _ = wake.wait(timeout: .now() + flushInterval)
            flush()
            if state.withLock({ $0.stopped }) { break }
        }
        done.signal()
    }

    private func flushNow() {
        let batch = state.withLock { s -> [Digest] in
            let b = s.pending
            s.pending = []
            s.pendingSet.removeAll(keepingCapacity: true)
            return b
        }
        pruneIfDue()
        if batch.isEmpty { return }
        do {
            try index.touch(batch)
            let now = DispatchTime.now().uptimeNanoseconds
            let recovered = state.withLock { s -> Bool in
                for d in batch { s.lastTouched[d] = now }
                defer { s.failing = false }
                return s.failing
            }
            if recovered { accessLog.info("access-time refresh works again") }
            flushes.add()
            touched.add(batch.count)
        } catch {
            failures.add()
            let first = state.withLock { s -> Bool in
                // Keep them for the next flush, within the bound.
                for d in batch where s.pending.count < maxPending && s.pendingSet.insert(d).inserted {
                    s.pending.append(d)
                }
                defer { s.failing = true }
                return !s.failing
            }
            if first {
                accessLog.error("refreshing access times of \(batch.count) blobs failed: \(error)")
            } else {
                accessLog.debug("refreshing access times still failing: \(error)")
            }
        }
    }

    private func pruneIfDue() {
        let now = DispatchTime.now().uptimeNanoseconds
        let window = UInt64(refreshAfter * 1e9)
        state.withLock { s in
            guard now &- s.lastPrune >= window else { return }
            s.lastPrune = now
            s.lastTouched = s.lastTouched.filter { now &- $0.value < window }
        }
    }
}
