import Foundation

/// A storage that wraps another and changes only some operations: every
/// operation it does not implement goes to `inner` unchanged (not to the
/// protocol's generic fallbacks, which would lose what `inner` does).
public protocol StorageDecorator: Storage {
    var inner: any Storage { get }
}

extension StorageDecorator {
    public func start() throws { try inner.start() }
    public func stop() throws { try inner.stop() }
    public func hasBlob(_ d: Digest) throws -> Bool { try inner.hasBlob(d) }
    public func getBlob(_ d: Digest) throws -> BlobSource? { try inner.getBlob(d) }
    public func openBlob(_ d: Digest) throws -> BlobSource? { try inner.openBlob(d) }
    public func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        try inner.read(d, offset: offset, length: length)
    }
    public func deleteBlob(_ d: Digest) throws { try inner.deleteBlob(d) }
    public func commitWrite(_ d: Digest, _ source: BlobSource) throws { try inner.commitWrite(d, source) }
    public func bulkDelete(_ ds: [Digest]) -> [String] { inner.bulkDelete(ds) }
    public func missingBlobs(_ ds: [Digest]) throws -> [Digest] { try inner.missingBlobs(ds) }
    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] { inner.bulkUpdateBlobs(blobs) }
    public func bulkReadBlobs(_ ds: [Digest]) throws -> [Digest: Data] { try inner.bulkReadBlobs(ds) }
    public func skipsWrite(_ d: Digest, _ source: BlobSource) throws -> Bool { try inner.skipsWrite(d, source) }
    public func recordVerified(_ d: Digest, _ source: BlobSource) { inner.recordVerified(d, source) }
    public func warm(_ ds: [Digest]) { inner.warm(ds) }
    public func prefetch(_ ds: [Digest]) { inner.prefetch(ds) }
}

extension Storage {
    /// The first layer of this stack that is a `T`, looking through decorators.
    public func layer<T>(_ type: T.Type) -> T? {
        var s: any Storage = self
        while true {
            if let t = s as? T { return t }
            guard let d = s as? any StorageDecorator else { return nil }
            s = d.inner
        }
    }
}
