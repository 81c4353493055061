import CASCore
import Foundation
import Synchronization

/// Turns prefetch hints (the files and subdirectories of a tree directory
/// first used) into bulk `warm` calls on the storage below, on a few
/// background threads: blobs up to `blobLimit`, at most `hintBudget` bytes of
/// one hint (a directory), in batches of up to `batchBytes` (a remote CAS
/// splits them further under its server's batch limit), in the order hinted.
///
/// - A reader that wants a blob a hint queued or a batch is fetching waits
///   for that batch (at most `readerWait`) instead of fetching it a second
///   time, one round trip for one blob.
/// - Large blobs are never fetched ahead: they cost nothing until read.
/// - Bounded: at most `maxQueued` batches wait (further hints are dropped)
///   and `threads` run at once, each holding one batch in memory; at
///   `stop()` queued batches are abandoned, and a reader never waits for an
///   abandoned one.
public final class PrefetchingStorage: StorageDecorator {
    public let inner: any Storage
    public let blobLimit: Int64
    public let batchBytes: Int64
    public let hintBudget: Int64
    public let threads: Int
    public let maxQueued: Int
    private let jobs = Mutex<BackgroundJobs?>(nil)
    private let stopping = Atomic<Bool>(false)
    /// Digests queued or being fetched, with how many batches hold each.
    private let inflight = NSCondition()
    nonisolated(unsafe) private var inflightDigests: [Digest: Int] = [:]  // guarded by `inflight`
    private let readerWait: TimeInterval = 5

    public init(_ inner: any Storage, blobLimit: Int64 = 1 << 20, batchBytes: Int64 = 4 << 20,
                hintBudget: Int64 = 64 << 20, threads: Int = 4, maxQueued: Int = 1024) {
        self.inner = inner
        self.blobLimit = blobLimit
        self.batchBytes = batchBytes
        self.hintBudget = hintBudget
        self.threads = threads
        self.maxQueued = maxQueued
    }

    public func stop() throws {
        stopping.store(true, ordering: .relaxed)
        jobs.withLock { $0 }?.abandon()
        // Nobody waits for what will not be fetched.
        inflight.lock()
        inflightDigests = [:]
        inflight.broadcast()
        inflight.unlock()
        try inner.stop()
    }

    public func prefetch(_ digests: [Digest]) {
        guard !stopping.load(ordering: .relaxed) else { return }
        var seen = Set<Digest>()
        var budget = hintBudget
        var wanted: [Digest] = []
        for d in digests where d.size > 0 && d.size <= blobLimit && d.size <= budget && seen.insert(d).inserted {
            wanted.append(d)
            budget -= d.size  // each at most blobLimit, and budget stays >= 0
        }
        guard !wanted.isEmpty else { return }
        let pool = jobs.withLock { p -> BackgroundJobs in
            if let p { return p }
            let made = BackgroundJobs(threads: threads, name: "casfs-prefetch")
            p = made
            return made
        }
        guard pool.pending < maxQueued else { return }
        // One job per batch, so that several threads work on one large hint.
        var batches: [[Digest]] = [[]]
        var bytes: Int64 = 0
        for d in wanted {
            if bytes + d.size > batchBytes, !batches[batches.count - 1].isEmpty {
                batches.append([])
                bytes = 0
            }
            batches[batches.count - 1].append(d)
            bytes += d.size
        }
        inflight.lock()
        for b in batches { for d in b { inflightDigests[d, default: 0] += 1 } }
        inflight.unlock()
        for b in batches { pool.submit { [self] in run(b) } }
    }

    private func run(_ digests: [Digest]) {
        defer {
            inflight.lock()
            for d in digests {
                if let n = inflightDigests[d], n > 1 { inflightDigests[d] = n - 1 } else { inflightDigests[d] = nil }
            }
            inflight.broadcast()
            inflight.unlock()
        }
        guard !stopping.load(ordering: .relaxed) else { return }
        inner.warm(digests)
    }

    /// If a queued or running batch holds the digest, waits (bounded) for it.
    private func waitForBatch(_ d: Digest) {
        inflight.lock()
        defer { inflight.unlock() }
        guard inflightDigests[d] != nil else { return }
        let deadline = Date().addingTimeInterval(readerWait)
        while inflightDigests[d] != nil, Date() < deadline {
            _ = inflight.wait(until: deadline)
        }
    }

    public func getBlob(_ d: Digest) throws -> BlobSource? {
        waitForBatch(d)
        return try inner.getBlob(d)
    }

    public func openBlob(_ d: Digest) throws -> BlobSource? {
        waitForBatch(d)
        return try inner.openBlob(d)
    }

    public func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        waitForBatch(d)
        return try inner.read(d, offset: offset, length: length)
    }
}
