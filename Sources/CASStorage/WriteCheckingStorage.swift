import CASCore
import Foundation
import Logging

/// Where writes enter the stack: the bytes are checked against the digest
/// (length and SHA-256) before anything is stored, and a write of a blob
/// that is present is a no-op that refreshes its access time. Every storage
/// below may trust what it is asked to store.
public final class WriteCheckingStorage: StorageDecorator {
    public let inner: any Storage
    private let stored: MetricCounter
    private let skipped: MetricCounter
    private let rejected: MetricCounter

    public init(_ inner: any Storage, metrics: MetricScope = .standalone("storage")) {
        self.inner = inner
        stored = metrics.counter(MetricCatalog.writesStored)
        skipped = metrics.counter(MetricCatalog.writesSkipped)
        rejected = metrics.counter(MetricCatalog.writesRejected)
    }

    /// Throws `sizeMismatch`/`digestMismatch` unless `source` is `digest`'s bytes.
    public func check(_ digest: Digest, _ source: BlobSource) throws {
        do {
            try source.verify(digest)
        } catch let e as StorageError {
            rejected.add()
            throw e
        }
    }

    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        try check(digest, source)
        if try inner.skipsWrite(digest, source) {
            skipped.add()
            return
        }
        try inner.commitWrite(digest, source)
        stored.add()
    }

    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        var statuses = [StorageError?](repeating: nil, count: blobs.count)
        var good: [Int] = []
        for (i, (d, data)) in blobs.enumerated() {
            if Int64(data.count) != d.size {
                statuses[i] = .sizeMismatch(expected: d, actualSize: Int64(data.count))
            } else {
                let actual = Digest.of(data)
                if actual != d { statuses[i] = .digestMismatch(expected: d, actual: actual) } else { good.append(i) }
            }
        }
        rejected.add(blobs.count - good.count)
        guard !good.isEmpty else { return statuses }
        let results = inner.bulkUpdateBlobs(good.map { blobs[$0] })
        for (k, i) in good.enumerated() {
            statuses[i] = k < results.count ? results[k] : .io(errno: EIO, "storage returned no status")
        }
        stored.add(good.count)
        return statuses
    }
}
