import CASCore
import Foundation
import Synchronization

/// Turns prefetch hints (the files and subdirectories of a tree directory
/// first used) into bulk `warm` calls on the storage below, on a few
/// background threads: blobs up to `blobLimit`, at most `hintBudget` bytes of
/// one hint (a directory), in batches of up to `batchBytes` (a remote CAS
/// splits them further under its server's batch limit), in the order hinted.
///
/// - A reader that wants a blob of a batch still queued runs that batch
///   itself, at once (no waiting behind other directories' batches); one
///   that wants a blob of a running batch waits for it (at most
///   `readerWait`). Either way the blob is fetched once, with its batch,
///   never alone.
/// - Large blobs are never fetched ahead: they cost nothing until read.
/// - Bounded: at most `maxQueued` batches wait (further hints are dropped)
///   and `threads` run at once in the background, each holding one batch in
///   memory; at `stop()` queued batches are abandoned, and a reader never
///   waits for an abandoned one.
public final class PrefetchingStorage: StorageDecorator {
    public let inner: any Storage
    public let blobLimit: Int64
    public let batchBytes: Int64
    public let hintBudget: Int64
    public let threads: Int
    public let maxQueued: Int
    private let jobs = Mutex<BackgroundJobs?>(nil)
    private let stopping = Atomic<Bool>(false)

    private final class Batch: @unchecked Sendable {
        let digests: [Digest]
        // Guarded by the storage's `lock`.
        var started = false
        var done = false
        init(_ digests: [Digest]) { self.digests = digests }
    }

    private let lock = NSCondition()
    /// The batch each queued or running digest belongs to (guarded by `lock`).
    nonisolated(unsafe) private var batchOf: [Digest: Batch] = [:]
    private let readerWait: TimeInterval = 30

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
        lock.lock()
        batchOf = [:]
        lock.broadcast()
        lock.unlock()
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
        var groups: [[Digest]] = [[]]
        var bytes: Int64 = 0
        lock.lock()
        for d in wanted where batchOf[d] == nil {
            if bytes + d.size > batchBytes, !groups[groups.count - 1].isEmpty {
                groups.append([])
                bytes = 0
            }
            groups[groups.count - 1].append(d)
            bytes += d.size
        }
        let batches = groups.filter { !$0.isEmpty }.map(Batch.init)
        for b in batches { for d in b.digests { batchOf[d] = b } }
        lock.unlock()
        for b in batches { pool.submit { [self] in run(b) } }
    }

    /// Runs `b` unless someone started it already.
    private func run(_ b: Batch) {
        lock.lock()
        guard !b.started else { return lock.unlock() }
        b.started = true
        lock.unlock()
        defer {
            lock.lock()
            b.done = true
            for d in b.digests where batchOf[d] === b { batchOf[d] = nil }
            lock.broadcast()
            lock.unlock()
        }
        guard !stopping.load(ordering: .relaxed) else { return }
        inner.warm(b.digests)
    }

    /// If a batch holds the digest: runs it here when it is still queued,
    /// or waits (bounded) for it when it is running.
    private func joinBatch(_ d: Digest) {
        lock.lock()
        guard let b = batchOf[d] else { return lock.unlock() }
        if !b.started {
            lock.unlock()
            return run(b)
        }
        let deadline = Date().addingTimeInterval(readerWait)
        while !b.done, batchOf[d] === b, Date() < deadline {
            _ = lock.wait(until: deadline)
        }
        lock.unlock()
    }

    public func getBlob(_ d: Digest) throws -> BlobSource? {
        joinBatch(d)
        return try inner.getBlob(d)
    }

    public func openBlob(_ d: Digest) throws -> BlobSource? {
        joinBatch(d)
        return try inner.openBlob(d)
    }

    public func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        joinBatch(d)
        return try inner.read(d, offset: offset, length: length)
    }
}
