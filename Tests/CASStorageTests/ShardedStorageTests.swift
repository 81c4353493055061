import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

final class ShardedStorageTests: XCTestCase {
    func memory() -> InstrumentedStorage { InstrumentedStorage(MemoryStorage(maxBytes: 1 << 20)) }

    func sharded(_ names: [String], threads: Int = 0) throws -> (ShardedStorage, [InstrumentedStorage]) {
        let stores = names.map { _ in memory() }
        let s = try ShardedStorage(shards: zip(names, stores).map { .init(name: $0, storage: $1) }, threadPoolSize: threads)
        try s.start()
        return (s, stores)
    }

    /// The blobs of BuildGrid's own examples land where BuildGrid puts them
    /// (results of `ShardedStorage._storage_from_digest` in BuildGrid 0.8.16).
    func testShardChoiceMatchesBuildGrid() throws {
        let (two, _) = try sharded(["a", "b"])
        let (three, _) = try sharded(["a", "b", "c"])
        let cases: [(Data, String, String)] = [
            (Data(), "b", "b"),
            (Data("hello".utf8), "a", "a"),
            (Data("hello world\n".utf8), "a", "a"),
            (Data("abc".utf8), "b", "c"),
            (Data((0...255).map { UInt8($0) }), "a", "a"),
        ]
        for (data, inTwo, inThree) in cases {
            let d = Digest.of(data)
            XCTAssertEqual(two.shardName(for: d), inTwo, "\(d)")
            XCTAssertEqual(three.shardName(for: d), inThree, "\(d)")
        }
        // The size is not part of the choice.
        let hello = Digest.of(Data("hello".utf8))
        XCTAssertEqual(two.shardName(for: try Digest(hash: hello.hash, size: 999_999)), "a")
    }

    /// Two names whose scores collide for the hash of "hello": the shard
    /// listed first wins, whichever it is (checked against BuildGrid).
    func testTieGoesToTheShardListedFirst() throws {
        let h = Digest.of(Data("hello".utf8))
        XCTAssertEqual(ShardedStorage.score(shard: "s46291", hash: h.hash), ShardedStorage.score(shard: "s55586", hash: h.hash))
        XCTAssertEqual(try sharded(["s46291", "s55586"]).0.shardName(for: h), "s46291")
        XCTAssertEqual(try sharded(["s55586", "s46291"]).0.shardName(for: h), "s55586")
    }

    func testBadShardListsAreRefused() {
        XCTAssertThrowsError(try ShardedStorage(shards: [], threadPoolSize: 0))
        XCTAssertThrowsError(try ShardedStorage(shards: [.init(name: "a", storage: memory()), .init(name: "a", storage: memory())],
                                                threadPoolSize: 0))
        XCTAssertThrowsError(try ShardedStorage(shards: [.init(name: "a b", storage: memory())], threadPoolSize: 0))
        XCTAssertTrue(ShardedStorage.isValidName(""))
        XCTAssertTrue(ShardedStorage.isValidName("Shard-01"))
        XCTAssertFalse(ShardedStorage.isValidName("shard_1"))
        XCTAssertFalse(ShardedStorage.isValidName("é"))
    }

    func testOneDigestReachesOnlyItsShard() throws {
        let (s, stores) = try sharded(["a", "b"])
        let data = Data("hello".utf8)
        let d = Digest.of(data)
        let (mine, other) = (stores[0], stores[1])  // "hello" → a
        try s.commitWrite(d, DataSource(data, verified: true))
        XCTAssertTrue(try mine.inner.hasBlob(d))
        XCTAssertFalse(try other.inner.hasBlob(d))
        XCTAssertTrue(try s.hasBlob(d))
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
        XCTAssertEqual(try s.read(d, offset: 1, length: 3), Data("ell".utf8))
        XCTAssertTrue(try s.skipsWrite(d, DataSource(data)))
        try s.deleteBlob(d)
        XCTAssertFalse(try mine.inner.hasBlob(d))
        XCTAssertEqual(other.getCalls.load(ordering: .relaxed), 0)
        XCTAssertEqual(other.writeCalls.load(ordering: .relaxed), 0)
    }

    func testBulkOperationsSplitAndMergeInRequestOrder() throws {
        let (s, stores) = try sharded(["a", "b", "c"], threads: 3)
        let blobs = (0..<60).map { blob("blob \($0)") }
        let statuses = s.bulkUpdateBlobs(blobs)
        XCTAssertEqual(statuses.count, blobs.count)
        XCTAssertTrue(statuses.allSatisfy { $0 == nil })
        var perShard = [0, 0, 0]
        for (d, _) in blobs {
            let i = s.childIndex(for: d)
            perShard[i] += 1
            for (j, store) in stores.enumerated() { XCTAssertEqual(try store.inner.hasBlob(d), i == j) }
        }
        XCTAssertTrue(perShard.allSatisfy { $0 > 0 }, "60 blobs spread over all shards: \(perShard)")

        let absent = (0..<10).map { blob("absent \($0)").0 }
        let asked = zip(absent, blobs.prefix(10).map(\.0)).flatMap { [$0, $1] }
        XCTAssertEqual(try s.missingBlobs(asked), absent, "request order")
        let read = try s.bulkReadBlobs(asked)
        XCTAssertEqual(read.count, 10)
        for (d, data) in blobs.prefix(10) { XCTAssertEqual(read[d], data) }
        XCTAssertEqual(s.bulkDelete(blobs.map(\.0)), [])
        XCTAssertEqual(try s.missingBlobs(blobs.map(\.0)).count, blobs.count)
    }

    /// A failing shard fails only its own blobs; statuses stay in place.
    func testOneFailingShard() throws {
        let (s, stores) = try sharded(["a", "b"])
        let blobs = (0..<20).map { blob("item \($0)") }
        let bad = stores[1]
        bad.failWrites.store(true, ordering: .relaxed)
        let statuses = s.bulkUpdateBlobs(blobs)
        for ((d, _), status) in zip(blobs, statuses) {
            if s.childIndex(for: d) == 1 {
                XCTAssertEqual(status?.errno, ENOSPC, "\(d)")
            } else {
                XCTAssertNil(status, "\(d)")
            }
        }
        bad.failWrites.store(false, ordering: .relaxed)
        XCTAssertTrue(s.bulkUpdateBlobs(blobs).allSatisfy { $0 == nil })

        bad.failReads.store(true, ordering: .relaxed)
        let onGood = try XCTUnwrap(blobs.first { s.childIndex(for: $0.0) == 0 })
        let onBad = try XCTUnwrap(blobs.first { s.childIndex(for: $0.0) == 1 })
        XCTAssertEqual(try s.getBlob(onGood.0)?.readAll(), onGood.1)
        XCTAssertThrowsError(try s.getBlob(onBad.0))
        XCTAssertThrowsError(try s.missingBlobs(blobs.map(\.0)), "as BuildGrid: a shard's error fails the call")
        bad.failReads.store(false, ordering: .relaxed)

        bad.failDeletes.store(true, ordering: .relaxed)
        let failed = s.bulkDelete(blobs.map(\.0))
        XCTAssertEqual(Set(failed), Set(blobs.filter { s.childIndex(for: $0.0) == 1 }.map(\.0.hash)))
    }

    /// With a thread pool, the shards' calls of one bulk operation run at the
    /// same time: each shard's call waits for the other's to begin.
    func testThreadPoolRunsShardCallsTogether() throws {
        let barrier = Barrier(2), inFlight = InFlight()
        let stores = [MeetingStorage(barrier: barrier, inFlight: inFlight), MeetingStorage(barrier: barrier, inFlight: inFlight)]
        let s = try ShardedStorage(shards: [.init(name: "a", storage: stores[0]), .init(name: "b", storage: stores[1])],
                                   threadPoolSize: 2)
        let blobs = (0..<10).map { blob("together \($0)") }
        XCTAssertTrue(s.bulkUpdateBlobs(blobs).allSatisfy { $0 == nil })
        XCTAssertEqual(try s.bulkReadBlobs(blobs.map(\.0)).count, 10)
        XCTAssertFalse(stores.contains { $0.missedMeeting.load(ordering: .relaxed) }, "shard calls ran one after another")
        XCTAssertEqual(inFlight.most, 2)
    }

    func testManyThreadsThroughOneShardedStorage() throws {
        let (s, stores) = try sharded(["x", "y", "z"], threads: 2)
        let errors = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 16) { t in
            let mine = (0..<25).map { blob("thread \(t) blob \($0)") }
            for (d, data) in mine.prefix(10) {
                do { try s.commitWrite(d, DataSource(data, verified: true)) } catch { errors.add(1, ordering: .relaxed) }
            }
            if s.bulkUpdateBlobs(Array(mine.dropFirst(10))).contains(where: { $0 != nil }) { errors.add(1, ordering: .relaxed) }
            do {
                let got = try s.bulkReadBlobs(mine.map(\.0))
                if got.count != mine.count || mine.contains(where: { got[$0.0] != $0.1 }) { errors.add(1, ordering: .relaxed) }
                if try !s.missingBlobs(mine.map(\.0)).isEmpty { errors.add(1, ordering: .relaxed) }
            } catch { errors.add(1, ordering: .relaxed) }
        }
        XCTAssertEqual(errors.load(ordering: .relaxed), 0)
        let total = try stores.map { store in try (0..<16).flatMap { t in (0..<25).map { blob("thread \(t) blob \($0)").0 } }
            .filter { try store.inner.hasBlob($0) }.count }
        XCTAssertEqual(total.reduce(0, +), 16 * 25, "each blob in exactly one shard")
    }
}

final class FanOutTests: XCTestCase {
    func testWidthZeroRunsInTheCallersThread() {
        let caller = pthread_self()
        let f = FanOut(width: 0)
        XCTAssertEqual(f.map(5) { i in pthread_equal(pthread_self(), caller) != 0 ? i : -1 }, [0, 1, 2, 3, 4])
    }

    func testNoMoreThanWidthAtOnce() {
        let f = FanOut(width: 2)
        let barrier = Barrier(2), inFlight = InFlight()
        let met = f.map(8) { i -> Bool in
            inFlight.enter()
            defer { inFlight.leave() }
            return barrier.arrive()
        }
        XCTAssertEqual(met, Array(repeating: true, count: 8), "pairs of calls ran together")
        XCTAssertEqual(inFlight.most, 2)
    }

    func testErrorsAfterEveryCallRan() {
        let f = FanOut(width: 3)
        let ran = Atomic<Int>(0)
        XCTAssertThrowsError(try f.mapThrowing(6) { i -> Int in
            ran.add(1, ordering: .relaxed)
            if i == 2 { throw StorageError.unavailable("call \(i)") }
            return i
        }) { XCTAssertEqual($0 as? StorageError, .unavailable("call 2")) }
        XCTAssertEqual(ran.load(ordering: .relaxed), 6)
    }
}
