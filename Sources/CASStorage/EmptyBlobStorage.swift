import CASCore
import Foundation

/// The empty blob exists in every store without being written (BuildGrid
/// never indexes it either). This decorator, applied once at the top of the
/// stack, answers for it so that no storage below ever sees it.
public final class EmptyBlobStorage: StorageDecorator {
    public let inner: any Storage

    public init(_ inner: any Storage) { self.inner = inner }

    private static let empty = DataSource(Data(), verified: true)

    public func hasBlob(_ d: Digest) throws -> Bool { d.isEmpty ? true : try inner.hasBlob(d) }
    public func getBlob(_ d: Digest) throws -> BlobSource? { d.isEmpty ? Self.empty : try inner.getBlob(d) }
    public func openBlob(_ d: Digest) throws -> BlobSource? { d.isEmpty ? Self.empty : try inner.openBlob(d) }
    public func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        d.isEmpty ? Data() : try inner.read(d, offset: offset, length: length)
    }
    public func deleteBlob(_ d: Digest) throws { if !d.isEmpty { try inner.deleteBlob(d) } }
    public func commitWrite(_ d: Digest, _ source: BlobSource) throws {
        if d.isEmpty {
            guard source.size == 0 else { throw StorageError.sizeMismatch(expected: d, actualSize: source.size) }
            return
        }
        try inner.commitWrite(d, source)
    }
    public func skipsWrite(_ d: Digest, _ source: BlobSource) throws -> Bool { d.isEmpty ? true : try inner.skipsWrite(d, source) }
    public func recordVerified(_ d: Digest, _ source: BlobSource) { if !d.isEmpty { inner.recordVerified(d, source) } }

    public func bulkDelete(_ ds: [Digest]) -> [String] { inner.bulkDelete(ds.filter { !$0.isEmpty }) }
    public func missingBlobs(_ ds: [Digest]) throws -> [Digest] {
        let asked = ds.filter { !$0.isEmpty }
        return asked.isEmpty ? [] : try inner.missingBlobs(asked)
    }
    public func bulkReadBlobs(_ ds: [Digest]) throws -> [Digest: Data] {
        let asked = ds.filter { !$0.isEmpty }
        var out = asked.isEmpty ? [:] : try inner.bulkReadBlobs(asked)
        if asked.count != ds.count { out[.empty] = Data() }
        return out
    }
    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        var statuses = [StorageError?](repeating: nil, count: blobs.count)
        var rest: [Int] = []
        for (i, (d, data)) in blobs.enumerated() {
            if d.isEmpty {
                if !data.isEmpty { statuses[i] = .sizeMismatch(expected: d, actualSize: Int64(data.count)) }
            } else {
                rest.append(i)
            }
        }
        guard !rest.isEmpty else { return statuses }
        let results = inner.bulkUpdateBlobs(rest.map { blobs[$0] })
        for (k, i) in rest.enumerated() {
            statuses[i] = k < results.count ? results[k] : .io(errno: EIO, "storage returned no status")
        }
        return statuses
    }
    public func warm(_ ds: [Digest]) { inner.warm(ds.filter { !$0.isEmpty }) }
    public func prefetch(_ ds: [Digest]) { inner.prefetch(ds.filter { !$0.isEmpty }) }
}
