import CASCore
import Foundation
import Synchronization

/// Turns prefetch hints (the files of a tree directory being listed) into
/// bulk `warm` calls on the storage below, on a few background threads:
/// blobs up to `blobLimit`, in batches of up to `batchBytes`, in the order
/// hinted. A reader that wants a blob a running batch is fetching waits for
/// that batch (bounded) instead of fetching it a second time. Hints are
/// dropped while `maxQueued` batches wait, and abandoned at `stop()`.
public final class PrefetchingStorage: StorageDecorator {
    public let inner: any Storage
    public let blobLimit: Int64
    public let batchBytes: Int64
    public let threads: Int
    public let maxQueued: Int
    private let jobs = Mutex<BackgroundJobs?>(nil)
    private let stopping = Atomic<Bool>(false)
    /// Digests a running batch is fetching.
    private let inflight = NSCondition()
    nonisolated(unsafe) private var inflightDigests: Set<Digest> = []  // guarded by `inflight`
    private let readerWait: TimeInterval = 5

    public init(_ inner: any Storage, blobLimit: Int64 = 1 << 20, batchBytes: Int64 = 4 << 20,
                threads: Int = 4, maxQueued: Int = 1024) {
        self.inner = inner
        self.blobLimit = blobLimit
        self.batchBytes = batchBytes
        self.threads = threads
        self.maxQueued = maxQueued
    }

    public func stop() throws {
        stopping.store(true, ordering: .relaxed)
        jobs.withLock { $0 }?.abandon()
        try inner.stop()
    }

    public func prefetch(_ digests: [Digest]) {
        guard !stopping.load(ordering: .relaxed) else { return }
        var seen = Set<Digest>()
        let wanted = digests.filter { $0.size > 0 && $0.size <= blobLimit && seen.insert($0).inserted }
        guard !wanted.isEmpty else { return }
        let pool = jobs.withLock { p -> BackgroundJobs in
            if let p { return p }
            let made = BackgroundJobs(threads: threads, name: "casfs-prefetch")
            p = made
            return made
        }
        guard pool.pending < maxQueued else { return }
        // One job per batch, so that several threads work on one large hint.
        var batch: [Digest] = []
        var bytes: Int64 = 0
        for d in wanted {
            if bytes + d.size > batchBytes, !batch.isEmpty {
                let b = batch
                pool.submit { [self] in run(b) }
                batch = []
                bytes = 0
            }
            batch.append(d)
            bytes += d.size  // each at most blobLimit: no overflow
        }
        if !batch.isEmpty {
            let last = batch
            pool.submit { [self] in run(last) }
        }
    }

    private func run(_ all: [Digest]) {
        guard !stopping.load(ordering: .relaxed) else { return }
        inflight.lock()
        let digests = all.filter { !inflightDigests.contains($0) }
        inflightDigests.formUnion(digests)
        inflight.unlock()
        guard !digests.isEmpty else { return }
        defer {
            inflight.lock()
            inflightDigests.subtract(digests)
            inflight.broadcast()
            inflight.unlock()
        }
        inner.warm(digests)
    }

    /// If a running batch holds the digest, waits (bounded) for it.
    private func waitForBatch(_ d: Digest) {
        inflight.lock()
        defer { inflight.unlock() }
        let deadline = Date().addingTimeInterval(readerWait)
        while inflightDigests.contains(d), Date() < deadline {
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
