/// A blob taken out of sight by `ReversibleDeletion.withdraw`: not readable
/// under its name any more, but not gone until discarded.
public struct WithdrawnBlob: Sendable {
    public let digest: Digest
    /// Where the storage keeps it meanwhile.
    public let token: String
    public init(digest: Digest, token: String) {
        self.digest = digest
        self.token = token
    }
}

/// A store whose deletes can be undone until they are final. An index uses
/// it so that a delete racing a re-add of the same blob keeps the bytes:
/// withdraw, look whether the blob was indexed again meanwhile, then restore
/// or discard.
public protocol ReversibleDeletion: Sendable {
    /// Takes the blob out of sight; nil if it was not there.
    func withdraw(_ digest: Digest) throws -> WithdrawnBlob?
    /// Puts a withdrawn blob back (or, if it was stored again meanwhile,
    /// discards the withdrawn copy). Returns false if it could not.
    func restore(_ blob: WithdrawnBlob) -> Bool
    /// Deletes a withdrawn blob for good.
    func discard(_ blob: WithdrawnBlob)
}

/// A store that can hold no more than `capacity` bytes (a memory cache):
/// a blob up to that size that it refuses now may be taken later.
public protocol CapacityBounded: Sendable {
    var capacity: Int64 { get }
}

/// A store that can list what it holds (to rebuild or reconcile an index).
public protocol BlobEnumerating: Sendable {
    /// Calls `body` for every well-formed blob the store holds.
    func forEachBlob(_ body: (Digest) throws -> Void) throws
}
