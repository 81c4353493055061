import CASCore
import Foundation
import Synchronization

/// Remembers which blobs were found present, so that asking again within
/// `expiry` costs no round trip to the storage below (a Redis `EXISTS`, a
/// remote `FindMissingBlobs`). Blobs are immutable: a name confirmed present
/// stays right until someone deletes it.
///
/// - Only presence is remembered; absence is always asked again (a blob
///   may be written at any time).
/// - A delete that passes through here (`rm` on the mount, a repair of a
///   corrupt blob) forgets the name at once; a delete made elsewhere
///   (`casfs cleanup`, another mount, BuildGrid) is seen once the entry
///   expires. Meanwhile a read of such a blob finds nothing and is ENOENT
///   (or EIO) for that read: the cached answer is only ever "present",
///   never bytes. A read or open that finds nothing forgets the name too.
/// - Memory is bounded: at most `capacity` names, kept in two generations
///   (the older one is dropped whole when the newer fills), 48 bytes each.
/// - `missingBlobs` and `skipsWrite` pass through (they refresh access
///   times below), and teach the cache what they found present.
public final class ExistenceCachingStorage: StorageDecorator {
    public let inner: any Storage
    public let expiry: Duration
    public let capacity: Int

    /// A digest without its text: the 32 hash bytes and the size.
    struct Key: Hashable {
        var h0, h1, h2, h3: UInt64
        var size: Int64

        init(_ d: Digest) {
            var words: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
            withUnsafeMutableBytes(of: &words) { w in
                var i = 0
                var hi: UInt8 = 0
                for (n, c) in d.hash.utf8.enumerated() {
                    let v = c <= UInt8(ascii: "9") ? c &- UInt8(ascii: "0") : c &- UInt8(ascii: "a") &+ 10
                    if n % 2 == 0 { hi = v } else { w[i] = hi << 4 | (v & 0xf); i += 1 }
                    if i == 32 { break }
                }
            }
            (h0, h1, h2, h3) = words
            size = d.size
        }
    }

    private struct State {
        var young: [Key: UInt64] = [:]
        var old: [Key: UInt64] = [:]
    }

    private let state = Mutex(State())
    private let deletes = RecentDeletes()
    private let start = ContinuousClock.now
    private let hits: MetricCounter
    private let misses: MetricCounter

    /// - Parameters:
    ///   - expiry: how long a "present" answer is trusted (deletes made elsewhere show after this).
    ///   - capacity: names remembered at most.
    public init(_ inner: any Storage, expiry: Duration = .seconds(30), capacity: Int = 262_144,
                metrics: MetricScope = .standalone("storage")) {
        self.inner = inner
        self.expiry = expiry
        self.capacity = max(2, capacity)
        hits = metrics.counter(MetricCatalog.existenceHits)
        misses = metrics.counter(MetricCatalog.existenceMisses)
    }

    /// Nanoseconds since this cache was made (a monotonic clock).
    private func now() -> UInt64 {
        let (s, a) = (ContinuousClock.now - start).components
        return UInt64(max(0, s)) &* 1_000_000_000 &+ UInt64(max(0, a / 1_000_000_000))
    }

    private var expiryNanoseconds: UInt64 {
        let (s, a) = expiry.components
        return UInt64(max(0, s)) &* 1_000_000_000 &+ UInt64(max(0, a / 1_000_000_000))
    }

    /// True if `d` was found present within the expiry.
    public func knowsPresent(_ d: Digest) -> Bool {
        let key = Key(d)
        let t = now()
        return state.withLock { s in
            if let until = s.young[key] ?? s.old[key], until > t { return true }
            return false
        }
    }

    /// Remembers these names as present, as found by a call to the storage
    /// below that began at moment `started` (`deletes.now`): not those
    /// deleted since (the answer may predate the delete).
    func remember(_ ds: some Sequence<Digest>, since started: UInt64) {
        let until = now() &+ expiryNanoseconds
        state.withLock { s in
            for d in ds where !deletes.deleted(d, since: started) {
                s.young[Key(d)] = until
                if s.young.count >= capacity / 2 {
                    s.old = s.young
                    s.young = [:]
                }
            }
        }
    }

    /// Drops these names (a blob removed or replaced below this layer, by a
    /// repair or a scrub).
    public func forget(_ ds: some Sequence<Digest>) {
        state.withLock { s in
            for d in ds {
                let k = Key(d)
                s.young[k] = nil
                s.old[k] = nil
            }
        }
    }

    public var count: Int { state.withLock { $0.young.count + $0.old.count } }

    // MARK: - Storage

    public func hasBlob(_ d: Digest) throws -> Bool {
        if knowsPresent(d) {
            hits.add()
            return true
        }
        misses.add()
        let started = deletes.now
        let found = try inner.hasBlob(d)
        if found { remember([d], since: started) }
        return found
    }

    public func getBlob(_ d: Digest) throws -> BlobSource? {
        let src = try forgettingCorrupt(d) { try inner.getBlob(d) }
        if src == nil { forget([d]) }
        return src
    }

    public func openBlob(_ d: Digest) throws -> BlobSource? {
        let src = try forgettingCorrupt(d) { try inner.openBlob(d) }
        if src == nil { forget([d]) }
        return src
    }

    public func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        let data = try forgettingCorrupt(d) { try inner.read(d, offset: offset, length: length) }
        if data == nil { forget([d]) }
        return data
    }

    /// A corrupt copy found below was removed (or is about to be): the name
    /// is no longer known present.
    private func forgettingCorrupt<T>(_ d: Digest, _ body: () throws -> T) throws -> T {
        do { return try body() } catch {
            if case .corrupt = StorageError.wrap(error) { forget([d]) }
            throw error
        }
    }

    public func commitWrite(_ d: Digest, _ source: BlobSource) throws {
        let started = deletes.now
        try inner.commitWrite(d, source)
        remember([d], since: started)
    }

    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        let started = deletes.now
        let results = inner.bulkUpdateBlobs(blobs)
        remember(zip(blobs, results).compactMap { $1 == nil ? $0.0 : nil }, since: started)
        return results
    }

    public func deleteBlob(_ d: Digest) throws {
        // Lookups under way may have found it before the delete: they do not
        // remember it after (`deletes`).
        deletes.record([d])
        forget([d])
        defer { forget([d]) }
        try inner.deleteBlob(d)
    }

    public func bulkDelete(_ ds: [Digest]) -> [String] {
        deletes.record(ds)
        forget(ds)
        defer { forget(ds) }
        return inner.bulkDelete(ds)
    }

    public func missingBlobs(_ ds: [Digest]) throws -> [Digest] {
        let started = deletes.now
        let missing = try inner.missingBlobs(ds)
        let absent = Set(missing)
        forget(missing)
        remember(ds.filter { !absent.contains($0) }, since: started)
        return missing
    }
}
