import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

/// Counts `hasBlob` calls that reach the storage below.
private final class CountingHas: StorageDecorator, Sendable {
    let inner: any Storage
    let hasCalls = Atomic<Int>(0)
    init(_ inner: any Storage) { self.inner = inner }
    func hasBlob(_ d: Digest) throws -> Bool {
        hasCalls.add(1, ordering: .relaxed)
        return try inner.hasBlob(d)
    }
}

final class ExistenceCachingStorageTests: XCTestCase {
    private func make(expiry: Duration = .seconds(30), capacity: Int = 1000)
        -> (ExistenceCachingStorage, CountingHas, MemoryStorage) {
        let memory = MemoryStorage(maxBytes: 1 << 20)
        let counting = CountingHas(memory)
        return (ExistenceCachingStorage(counting, expiry: expiry, capacity: capacity), counting, memory)
    }

    func testPresentIsAnsweredFromMemoryAbsentIsAlwaysAsked() throws {
        let (cache, counting, memory) = make()
        let (d, data) = blob("present")
        try memory.commitWrite(d, DataSource(data))
        XCTAssertTrue(try cache.hasBlob(d))
        XCTAssertTrue(try cache.hasBlob(d))
        XCTAssertTrue(try cache.hasBlob(d))
        XCTAssertEqual(counting.hasCalls.load(ordering: .relaxed), 1, "asked once")
        let (absent, _) = blob("absent")
        XCTAssertFalse(try cache.hasBlob(absent))
        XCTAssertFalse(try cache.hasBlob(absent))
        XCTAssertEqual(counting.hasCalls.load(ordering: .relaxed), 3, "absence is never remembered")
        // Written through it: known present without asking.
        let (w, wd) = blob("written")
        try cache.commitWrite(w, DataSource(wd))
        XCTAssertTrue(try cache.hasBlob(w))
        XCTAssertEqual(counting.hasCalls.load(ordering: .relaxed), 3)
    }

    func testDeletesThroughItAreSeenAtOnce() throws {
        let (cache, _, memory) = make()
        let (d, data) = blob("deleted")
        try memory.commitWrite(d, DataSource(data))
        XCTAssertTrue(try cache.hasBlob(d))
        try cache.deleteBlob(d)
        XCTAssertFalse(try cache.hasBlob(d))
        let (e, edata) = blob("bulk deleted")
        try memory.commitWrite(e, DataSource(edata))
        XCTAssertTrue(try cache.hasBlob(e))
        XCTAssertEqual(cache.bulkDelete([e]), [])
        XCTAssertFalse(try cache.hasBlob(e))
    }

    func testDeletesElsewhereShowAfterTheExpiryAndReadsNeverGetWrongBytes() throws {
        let (cache, _, memory) = make(expiry: .milliseconds(200))
        let (d, data) = blob("deleted elsewhere")
        try memory.commitWrite(d, DataSource(data))
        XCTAssertTrue(try cache.hasBlob(d))
        try memory.deleteBlob(d)  // behind the cache's back
        XCTAssertTrue(try cache.hasBlob(d), "still believed present within the expiry")
        XCTAssertNil(try cache.openBlob(d), "a read finds nothing: no bytes")
        XCTAssertFalse(try cache.hasBlob(d), "and the read made it forget the name")
        // Without a read: gone once the entry expires.
        try memory.commitWrite(d, DataSource(data))
        XCTAssertTrue(try cache.hasBlob(d))
        try memory.deleteBlob(d)
        usleep(300_000)
        XCTAssertFalse(try cache.hasBlob(d))
    }

    func testMemoryIsBounded() throws {
        let (cache, counting, memory) = make(capacity: 100)
        var digests: [Digest] = []
        for i in 0..<1000 {
            let (d, data) = blob("blob \(i)")
            try memory.commitWrite(d, DataSource(data))
            XCTAssertTrue(try cache.hasBlob(d))
            digests.append(d)
        }
        XCTAssertLessThanOrEqual(cache.count, 100)
        // The newest are still known; the oldest were forgotten and are asked again.
        let before = counting.hasCalls.load(ordering: .relaxed)
        XCTAssertTrue(try cache.hasBlob(digests[999]))
        XCTAssertEqual(counting.hasCalls.load(ordering: .relaxed), before)
        XCTAssertTrue(try cache.hasBlob(digests[0]))
        XCTAssertEqual(counting.hasCalls.load(ordering: .relaxed), before + 1)
    }

    func testMissingBlobsPassesThroughAndTeaches() throws {
        let (cache, counting, memory) = make()
        let (d, data) = blob("one")
        let (absent, _) = blob("two")
        try memory.commitWrite(d, DataSource(data))
        XCTAssertEqual(try cache.missingBlobs([d, absent]), [absent])
        XCTAssertTrue(try cache.hasBlob(d))
        XCTAssertEqual(counting.hasCalls.load(ordering: .relaxed), 0)
    }

    /// A lookup that found the blob before a delete through the cache does
    /// not remember it afterwards (its answer predates the delete).
    func testALookupRacingADeleteDoesNotBringItBack() throws {
        let memory = MemoryStorage(maxBytes: 1 << 20)
        let racing = DeletingDuringHas(memory)
        let cache = ExistenceCachingStorage(racing, expiry: .seconds(30), capacity: 1000)
        racing.outer.withLock { $0 = cache }
        let (d, data) = blob("deleted while looked up")
        try memory.commitWrite(d, DataSource(data))
        XCTAssertTrue(try cache.hasBlob(d), "the storage below said present before the delete")
        XCTAssertFalse(cache.knowsPresent(d))
        XCTAssertFalse(try cache.hasBlob(d))
    }

    /// A read that finds a corrupt copy forgets the name (the copy was removed below).
    func testACorruptReadForgetsTheName() throws {
        let memory = MemoryStorage(maxBytes: 1 << 20)
        let corrupt = CorruptOnOpen(memory)
        let cache = ExistenceCachingStorage(corrupt, expiry: .seconds(30), capacity: 1000)
        let (d, data) = blob("corrupt below")
        try memory.commitWrite(d, DataSource(data))
        XCTAssertTrue(try cache.hasBlob(d))
        XCTAssertTrue(cache.knowsPresent(d))
        XCTAssertThrowsError(try cache.openBlob(d))
        XCTAssertFalse(cache.knowsPresent(d))
    }
}

/// Deletes the blob through `outer` while answering its `hasBlob` (once).
private final class DeletingDuringHas: StorageDecorator, Sendable {
    let inner: any Storage
    let outer = Mutex<ExistenceCachingStorage?>(nil)
    let done = Atomic<Bool>(false)
    init(_ inner: any Storage) { self.inner = inner }
    func hasBlob(_ d: Digest) throws -> Bool {
        let found = try inner.hasBlob(d)
        if !done.exchange(true, ordering: .relaxed), let o = outer.withLock({ $0 }) { try o.deleteBlob(d) }
        return found
    }
}

/// Reads of every blob find it corrupt.
private final class CorruptOnOpen: StorageDecorator, Sendable {
    let inner: any Storage
    init(_ inner: any Storage) { self.inner = inner }
    func openBlob(_ d: Digest) throws -> BlobSource? { throw StorageError.corrupt(d, source: "test") }
}
