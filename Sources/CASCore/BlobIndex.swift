import Foundation

/// What an index of blobs (the Redis index) offers beyond `Storage`:
/// listing, totals and access-time refresh. The mount uses it for readdir,
/// statfs and to keep read blobs from being evicted.
public protocol BlobIndex: Sendable {
    /// Refreshes the access time of each digest (a blob that is read is not evicted).
    func touch(_ digests: [Digest]) throws
    /// One page of indexed digests. Start with cursor 0; a returned cursor of 0 ends the walk.
    func listPage(cursor: UInt64, count: Int) throws -> (cursor: UInt64, digests: [Digest])
    /// Sum of the sizes of indexed blobs.
    func totalSize() throws -> Int64
    /// Number of indexed blobs.
    func blobCount() throws -> Int64
    /// The blob count as of at most `maxAge` seconds ago without waiting for
    /// it to be computed (nil until known).
    func recentBlobCount(maxAge: Double) -> Int64?
}

extension BlobIndex {
    public func recentBlobCount(maxAge: Double) -> Int64? { try? blobCount() }
}
