import Foundation

/// The storage operations of a CAS, with BuildGrid's StorageABC semantics.
/// Implementations are thread-safe and synchronous: callers are FUSE worker
/// threads and command-line tools, not async tasks.
///
/// Below the write-checking decorator, `commitWrite` and `bulkUpdateBlobs`
/// receive bytes that casfs has verified against their digests; what a
/// storage returns may only be trusted where the source says `isVerified`.
public protocol Storage: Sendable {
    /// Brings the storage up (pools, connections, writer threads).
    func start() throws
    /// Drains pending work and closes.
    func stop() throws

    /// True if present. Must not refresh access time.
    func hasBlob(_ digest: Digest) throws -> Bool
    /// The whole blob, or nil if absent (a remote blob is fetched whole).
    func getBlob(_ digest: Digest) throws -> BlobSource?
    /// A handle for reading ranges of the blob, or nil if absent. Cheap to
    /// get (nothing is fetched for a remote blob); it keeps the bytes
    /// readable while held where the storage can (an open file, memory).
    func openBlob(_ digest: Digest) throws -> BlobSource?
    /// Up to `length` bytes at `offset`, or nil if the blob is absent.
    func read(_ digest: Digest, offset: Int64, length: Int) throws -> Data?
    /// Removes the blob if present.
    func deleteBlob(_ digest: Digest) throws
    /// Stores `source` under `digest`. The caller has verified the bytes.
    func commitWrite(_ digest: Digest, _ source: BlobSource) throws

    /// Deletes many; returns the hashes that could not be deleted.
    func bulkDelete(_ digests: [Digest]) -> [String]
    /// The subset of `digests` not present; refreshes the access time of the others.
    func missingBlobs(_ digests: [Digest]) throws -> [Digest]
    /// Stores many; one status per blob, in order (nil means success).
    func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?]
    /// The blobs present among `digests`.
    func bulkReadBlobs(_ digests: [Digest]) throws -> [Digest: Data]

    /// True when a write of `source` (bytes verified against `digest`) can
    /// be skipped because the blob is present and intact (its access time is
    /// refreshed, as `missingBlobs` does). A store that can compare its copy
    /// with `source` does, so a damaged copy is replaced rather than kept.
    /// Only what a write itself would touch is consulted: a storage that
    /// defers writes to a slower one answers without waiting for it.
    func skipsWrite(_ digest: Digest, _ source: BlobSource) throws -> Bool
    /// `source`'s bytes were verified against `digest`: a storage that can
    /// keep a proof of it (tied to its file) does, so it is not checked again.
    func recordVerified(_ digest: Digest, _ source: BlobSource)
    /// Brings these blobs into the fastest layer of the storage (a cache)
    /// and returns once they can be read without the slower layers (a cache
    /// may finish storing them in the background, serving them from memory
    /// meanwhile). A storage without layers does nothing.
    func warm(_ digests: [Digest])
    /// A hint that these blobs are about to be read. Returns at once.
    func prefetch(_ digests: [Digest])
}

extension Storage {
    public func start() throws {}
    public func stop() throws {}
    public func prefetch(_ digests: [Digest]) {}
    public func warm(_ digests: [Digest]) {}
    public func recordVerified(_ digest: Digest, _ source: BlobSource) {}

    public func openBlob(_ digest: Digest) throws -> BlobSource? { try getBlob(digest) }

    public func read(_ digest: Digest, offset: Int64, length: Int) throws -> Data? {
        guard let src = try openBlob(digest) else { return nil }
        return try src.read(offset: offset, length: length)
    }

    public func skipsWrite(_ digest: Digest, _ source: BlobSource) throws -> Bool {
        try missingBlobs([digest]).isEmpty
    }

    public func bulkDelete(_ digests: [Digest]) -> [String] {
        var failed: [String] = []
        for d in digests {
            do { try deleteBlob(d) } catch { failed.append(d.hash) }
        }
        return failed
    }

    public func missingBlobs(_ digests: [Digest]) throws -> [Digest] {
        try digests.filter { try !hasBlob($0) }
    }

    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        blobs.map { d, data in
            do {
                try commitWrite(d, DataSource(data))
                return nil
            } catch {
                return StorageError.wrap(error)
            }
        }
    }

    public func bulkReadBlobs(_ digests: [Digest]) throws -> [Digest: Data] {
        var out: [Digest: Data] = [:]
        for d in digests {
            if let src = try getBlob(d) { out[d] = try src.readAll() }
        }
        return out
    }
}

extension StorageError {
    /// Any error as a StorageError (foreign errors become EIO with their text).
    public static func wrap(_ error: Error) -> StorageError {
        if let e = error as? StorageError { return e }
        return .io(errno: EIO, String(describing: error))
    }
}
