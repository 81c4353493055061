import CASCore
import Foundation
import Synchronization

/// Small blobs just fetched (and verified), kept in memory for a moment so
/// that the reads that follow a prefetch (a walk of a tree, the page-cache
/// pushes after its listing) do not open them again from the cache below.
/// Bounded by bytes, oldest first; entries also go after `maxAge`.
final class FreshBlobs: Sendable {
    let maxBytes: Int64
    let maxAge: Duration
    private struct State {
        var blobs: [Digest: (data: Data, at: ContinuousClock.Instant)] = [:]
        var order: [Digest] = []
        var head = 0
        var bytes: Int64 = 0
    }
    private let state = Mutex(State())

    init(maxBytes: Int64 = 32 << 20, maxAge: Duration = .seconds(10)) {
        self.maxBytes = maxBytes
        self.maxAge = maxAge
    }

    func insert(_ d: Digest, _ data: Data) {
        let n = Int64(data.count)
        guard n <= maxBytes / 64 else { return }
        let now = ContinuousClock.now
        state.withLock { s in
            guard s.blobs[d] == nil else { return }
            s.blobs[d] = (data, now)
            s.order.append(d)
            s.bytes += n
            while s.bytes > maxBytes, s.head < s.order.count { drop(&s) }
            // Entries expire oldest first: their places in `order` go too.
            while s.head < s.order.count {
                if let e = s.blobs[s.order[s.head]], now - e.at < maxAge { break }
                drop(&s)
            }
            if s.head > 1024, s.head * 2 > s.order.count {
                s.order.removeFirst(s.head)
                s.head = 0
            }
            // Places of entries taken by `get` or `remove`: `order` stays
            // within twice the entries held (plus a little).
            if s.order.count - s.head > 2 * s.blobs.count + 1024 {
                s.order = s.order[s.head...].filter { s.blobs[$0] != nil }
                s.head = 0
            }
        }
    }

    private func drop(_ s: inout State) {
        let d = s.order[s.head]
        s.head += 1
        if let e = s.blobs.removeValue(forKey: d) { s.bytes -= Int64(e.data.count) }
    }

    func get(_ d: Digest) -> Data? {
        let now = ContinuousClock.now
        return state.withLock { s -> Data? in
            guard let e = s.blobs[d] else { return nil }
            guard now - e.at < maxAge else {
                s.blobs[d] = nil
                s.bytes -= Int64(e.data.count)
                return nil
            }
            return e.data
        }
    }

    func remove(_ d: Digest) {
        state.withLock { s in
            if let e = s.blobs.removeValue(forKey: d) { s.bytes -= Int64(e.data.count) }
        }
    }
}
