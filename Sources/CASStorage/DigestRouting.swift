import CASCore
import Foundation

/// A storage that keeps each blob in exactly one of its children, chosen from
/// the digest alone (BuildGrid's sharded and size-differentiated storages).
/// Operations on one digest go to its child; bulk operations are split by
/// child, sent (through `fanOut`, so possibly at the same time) and merged.
/// Conforming types only say how to choose.
public protocol DigestRouting: Storage {
    /// Every child, each reachable through `childIndex`.
    var children: [any Storage] { get }
    /// The index in `children` of the child that holds `digest`.
    func childIndex(for digest: Digest) -> Int
    /// Runs the per-child calls of a bulk operation.
    var fanOut: FanOut { get }
}

/// The positions of a bulk request that go to one child, in request order.
struct RoutedGroup: Sendable {
    let child: Int
    var positions: [Int]
}

extension DigestRouting {
    public func child(for d: Digest) -> any Storage { children[childIndex(for: d)] }

    /// Splits a request by child, groups in order of first appearance.
    func groups(_ digests: [Digest]) -> [RoutedGroup] {
        var slot: [Int: Int] = [:]
        var out: [RoutedGroup] = []
        for (i, d) in digests.enumerated() {
            let c = childIndex(for: d)
            if let k = slot[c] {
                out[k].positions.append(i)
            } else {
                slot[c] = out.count
                out.append(RoutedGroup(child: c, positions: [i]))
            }
        }
        return out
    }

    public func start() throws { try ChildStorages.start(children) }
    public func stop() throws { try ChildStorages.stop(children) }

    // MARK: one digest

    public func hasBlob(_ d: Digest) throws -> Bool { try child(for: d).hasBlob(d) }
    public func getBlob(_ d: Digest) throws -> BlobSource? { try child(for: d).getBlob(d) }
    public func openBlob(_ d: Digest) throws -> BlobSource? { try child(for: d).openBlob(d) }
    public func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        try child(for: d).read(d, offset: offset, length: length)
    }
    public func deleteBlob(_ d: Digest) throws { try child(for: d).deleteBlob(d) }
    public func commitWrite(_ d: Digest, _ source: BlobSource) throws { try child(for: d).commitWrite(d, source) }
    public func skipsWrite(_ d: Digest, _ source: BlobSource) throws -> Bool { try child(for: d).skipsWrite(d, source) }
    public func recordVerified(_ d: Digest, _ source: BlobSource) { child(for: d).recordVerified(d, source) }

    // MARK: many digests

    /// In request order (BuildGrid lists them grouped by shard).
    public func missingBlobs(_ ds: [Digest]) throws -> [Digest] {
        let gs = groups(ds)
        let children = children
        let answers = try fanOut.mapThrowing(gs.count) { k in
            try children[gs[k].child].missingBlobs(gs[k].positions.map { ds[$0] })
        }
        let missing = Set(answers.joined())
        return ds.filter { missing.contains($0) }
    }

    /// One status per blob, in request order.
    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        let gs = groups(blobs.map(\.0))
        let children = children
        let batches = gs.map { g in g.positions.map { (blobs[$0].0, blobs[$0].1) } }
        let answers = fanOut.map(gs.count) { k in children[gs[k].child].bulkUpdateBlobs(batches[k]) }
        var statuses = [StorageError?](repeating: .io(errno: EIO, "inconsistent batch results"), count: blobs.count)
        for (g, answer) in zip(gs, answers) {
            for (k, i) in g.positions.enumerated() {
                statuses[i] = k < answer.count ? answer[k] : .io(errno: EIO, "inconsistent batch results")
            }
        }
        return statuses
    }

    public func bulkReadBlobs(_ ds: [Digest]) throws -> [Digest: Data] {
        let gs = groups(ds)
        let children = children
        let answers = try fanOut.mapThrowing(gs.count) { k in
            try children[gs[k].child].bulkReadBlobs(gs[k].positions.map { ds[$0] })
        }
        var found: [Digest: Data] = [:]
        for answer in answers { found.merge(answer) { a, _ in a } }
        return found
    }

    public func bulkDelete(_ ds: [Digest]) -> [String] {
        let gs = groups(ds)
        let children = children
        return Array(fanOut.map(gs.count) { k in children[gs[k].child].bulkDelete(gs[k].positions.map { ds[$0] }) }.joined())
    }

    public func warm(_ ds: [Digest]) {
        let gs = groups(ds)
        let children = children
        _ = fanOut.map(gs.count) { k in children[gs[k].child].warm(gs[k].positions.map { ds[$0] }) }
    }

    public func prefetch(_ ds: [Digest]) {
        for g in groups(ds) { children[g.child].prefetch(g.positions.map { ds[$0] }) }
    }
}
