import CASCore
import CASStorage
import Foundation
import Synchronization

/// A reusable meeting point for `parties` threads. `arrive` returns true once
/// all have arrived, false if they did not within `limit` seconds (a guard
/// against hanging forever when calls are not concurrent, not a measurement).
final class Barrier: @unchecked Sendable {
    private let parties: Int
    private let cond = NSCondition()
    private var count = 0
    private var generation = 0

    init(_ parties: Int) { self.parties = parties }

    func arrive(limit: Double = 60) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        let gen = generation
        count += 1
        if count == parties {
            count = 0
            generation += 1
            cond.broadcast()
            return true
        }
        let deadline = Date().addingTimeInterval(limit)
        while gen == generation {
            if !cond.wait(until: deadline) { return false }
        }
        return true
    }
}

/// Counts calls in flight and the most seen at once.
final class InFlight: Sendable {
    private let state = Mutex((now: 0, most: 0))
    func enter() { state.withLock { $0.now += 1; $0.most = max($0.most, $0.now) } }
    func leave() { state.withLock { $0.now -= 1 } }
    var most: Int { state.withLock { $0.most } }
}

/// A memory store whose bulk calls meet at a barrier shared with other
/// stores: a bulk operation over several of them completes only if their
/// calls run at the same time.
final class MeetingStorage: StorageDecorator {
    let inner: any Storage
    let barrier: Barrier
    let inFlight: InFlight
    let missedMeeting = Atomic<Bool>(false)

    init(barrier: Barrier, inFlight: InFlight) {
        inner = MemoryStorage(maxBytes: 1 << 20)
        self.barrier = barrier
        self.inFlight = inFlight
    }

    private func meet() {
        inFlight.enter()
        defer { inFlight.leave() }
        if !barrier.arrive() { missedMeeting.store(true, ordering: .relaxed) }
    }

    func bulkReadBlobs(_ ds: [Digest]) throws -> [Digest: Data] {
        meet()
        return try inner.bulkReadBlobs(ds)
    }

    func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        meet()
        return inner.bulkUpdateBlobs(blobs)
    }
}
