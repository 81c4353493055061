import CASCore
import CASStorage
import Foundation
import Redis
import Synchronization
import TestSupport
import XCTest

/// `reconcile` never leaves a key for bytes the store no longer holds.
final class IndexStoreAgreementTests: XCTestCase {
    /// A store that lists its blobs, and deletes some of them right after
    /// listing them (as cleanup, an unlink or a scrub beside a reconcile would).
    final class ListingStorage: Storage, BlobEnumerating, Sendable {
        let inner = FakeStorage()
        let deleteAfterListing = Mutex<Set<Digest>>([])
        /// Stored again once it has been seen missing (a write racing the reconcile).
        let storeAgainAfterALook = Mutex<[Digest: Data]>([:])

        func hasBlob(_ d: Digest) throws -> Bool {
            let has = try inner.hasBlob(d)
            if !has, let data = storeAgainAfterALook.withLock({ $0.removeValue(forKey: d) }) {
                try inner.commitWrite(d, DataSource(data, verified: true))
            }
            return has
        }
        func getBlob(_ d: Digest) throws -> BlobSource? { try inner.getBlob(d) }
        func deleteBlob(_ d: Digest) throws { try inner.deleteBlob(d) }
        func commitWrite(_ d: Digest, _ s: BlobSource) throws { try inner.commitWrite(d, s) }

        func forEachBlob(_ body: (Digest) throws -> Void) throws {
            let listed = inner.state.withLock { Array($0.blobs.keys) }
            for d in listed {
                try body(d)
                if deleteAfterListing.withLock({ $0.contains(d) }) { inner.remove(d) }
            }
        }
    }

    func testReconcileTakesBackKeysOfBlobsDeletedWhileItRan() throws {
        let server = try RedisServer.unixSocket()
        let redis = server.pool()
        let store = ListingStorage()
        let index = try RedisIndex(redis: redis, storage: store)
        let blobs = (0..<6).map { blob("stored before the reconcile \($0)") }
        for (d, data) in blobs { try store.commitWrite(d, DataSource(data, verified: true)) }
        let deleted = [blobs[1].0, blobs[4].0]
        store.deleteAfterListing.withLock { $0 = Set(deleted) }

        let report = try index.reconcile()
        XCTAssertEqual(report.added, 4, "\(report)")
        XCTAssertEqual(report.addedBytes, blobs.filter { !deleted.contains($0.0) }.reduce(0) { $0 + $1.0.size })
        for (d, _) in blobs {
            let k: String = index.key(d)
            XCTAssertEqual(try redis.exists(k), !deleted.contains(d), "\(d): key and store disagree")
        }
        let kept = blobs.filter { !deleted.contains($0.0) }.reduce(Int64(0)) { $0 + $1.0.size }
        XCTAssertEqual(try index.totalSize(), kept, "total_size counts deleted blobs")
        XCTAssertEqual(report.totalAfter, kept)
    }

    /// A blob deleted after it was listed, then stored again while the
    /// reconcile checked: its key stays, counted once.
    func testReconcileKeepsTheKeyOfABlobStoredAgain() throws {
        let server = try RedisServer.unixSocket()
        let redis = server.pool()
        let store = ListingStorage()
        let index = try RedisIndex(redis: redis, storage: store)
        let (d, data) = blob("deleted and stored again")
        try store.commitWrite(d, DataSource(data, verified: true))
        store.deleteAfterListing.withLock { $0 = [d] }
        store.storeAgainAfterALook.withLock { $0 = [d: data] }
        _ = try index.reconcile()
        XCTAssertTrue(store.inner.contains(d), "the test's premise: the blob was stored again")
        XCTAssertTrue(store.storeAgainAfterALook.withLock { $0.isEmpty }, "the test's premise: the blob was seen missing")
        let k: String = index.key(d)
        XCTAssertTrue(try redis.exists(k), "the key of a stored blob was taken out")
        XCTAssertEqual(try index.totalSize(), d.size)
    }
}
