import CASConfig
import CASCore
import CASStorage
import Foundation
import TestSupport
import XCTest

/// The storage contract (TestSupport's `StorageContract`), run here against
/// MemoryStorage; each subclass runs the same test methods against another
/// storage: DiskStorage, RedisIndex over a disk store (real redis-server),
/// VerifyingStorage, WithCacheStorage (memory over disk, memory over a
/// verified disk, a disk over a verified Redis index) and the stack a
/// configuration builds. (Each subclass declares a test of its own too: test
/// discovery lists the inherited methods only of classes that declare one.)
class StorageContractTests: XCTestCase {
    var contract: StorageContract!
    var cleanups: [() -> Void] = []

    /// The storage under test, fresh for each test method.
    func makeContract() throws -> StorageContract {
        StorageContract("MemoryStorage", MemoryStorage(maxBytes: 64 << 20), traits: .init(canBeDamaged: false))
    }

    override func setUpWithError() throws {
        contract = try makeContract()
    }

    override func tearDown() {
        contract = nil
        for c in cleanups.reversed() { c() }
        cleanups = []
    }

    /// A new directory removed after the test.
    func scratch() -> String {
        let dir = tempDir(String(describing: type(of: self)))
        cleanups.append { try? FileManager.default.removeItem(atPath: dir) }
        return dir
    }

    func testWriteThenRead() throws { try contract.writeThenRead() }
    func testSizeIsPartOfIdentity() throws { try contract.sizeIsPartOfIdentity() }
    func testAbsentBlob() throws { try contract.absentBlob() }
    func testBulkOperations() throws { try contract.bulkOperations() }
    func testDelete() throws { try contract.delete() }
    func testEmptyBlob() throws { try contract.emptyBlob() }
    func testConcurrentUse() throws { try contract.concurrentUse() }
    func testDamagedBytesNeverReturnedVerified() throws { try contract.damagedBytesNeverReturnedVerified() }
}

/// Damages the object of `d` in a disk store (one byte flipped in place).
/// A disk store's proof names the file's modification time, which the
/// kernel keeps in coarse ticks: the flip waits until the clock has moved
/// past the time the object was written, as damage done later would.
func damageDiskObject(_ disk: DiskStorage, _ d: Digest) throws {
    let path = disk.objectPath(d)
    var st = stat()
    guard stat(path, &st) == 0 else { throw TestSupportError("stat \(path): \(String(cString: strerror(errno)))") }
    let written = Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) / 1e9
    while Date().timeIntervalSince1970 < written + 0.02 { usleep(5000) }
    try flipByte(path: path, at: d.size / 2)
}

final class DiskStorageContractTests: StorageContractTests {
    var disk: DiskStorage!

    override func makeContract() throws -> StorageContract {
        let disk = try DiskStorage(root: scratch())
        self.disk = disk
        return StorageContract("DiskStorage", disk) { try damageDiskObject(disk, $0) }
    }

    /// A file of another length at a blob's path is not that blob (nor is
    /// it removed by a delete of the blob).
    func testFileOfAnotherLengthIsNotTheBlob() throws {
        let data = randomData(5000, seed: 1)
        let d = Digest.of(data)
        let p = disk.objectPath(d)
        try FileManager.default.createDirectory(atPath: (p as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try data.prefix(4000).write(to: URL(fileURLWithPath: p))
        XCTAssertFalse(try disk.hasBlob(d))
        XCTAssertNil(try disk.openBlob(d))
        try disk.deleteBlob(d)
        XCTAssertTrue(FileManager.default.fileExists(atPath: p))
        try disk.commitWrite(d, DataSource(data, verified: true))
        XCTAssertEqual(try disk.getBlob(d)?.readAll(), data, "a write replaces the file of the wrong length")
    }
}

final class RedisIndexStorageContractTests: StorageContractTests {
    var redis: RedisServer?

    override func makeContract() throws -> StorageContract {
        let server = try RedisServer.unixSocket()
        redis = server
        cleanups.append { [weak self] in
            self?.redis?.stop()
            self?.redis = nil
        }
        let disk = try DiskStorage(root: scratch())
        let index = try RedisIndex(redis: server.pool(), storage: disk)
        self.index = index
        return StorageContract("RedisIndex over DiskStorage", index) { try damageDiskObject(disk, $0) }
    }

    var index: RedisIndex!

    /// total_size is the sum of the indexed sizes after writes, bulk writes,
    /// deletes and concurrent use.
    func testTotalSizeFollowsTheIndex() throws {
        try contract.bulkOperations()
        try contract.delete()
        try contract.concurrentUse()
        var sum: Int64 = 0
        var count: Int64 = 0
        var cursor: UInt64 = 0
        repeat {
            let page = try index.listPage(cursor: cursor, count: 1000)
            sum += page.digests.map(\.size).reduce(0, +)
            count += Int64(page.digests.count)
            cursor = page.cursor
        } while cursor != 0
        XCTAssertEqual(try index.totalSize(), sum, "total_size differs from the sizes indexed")
        XCTAssertEqual(try index.blobCount(), count)
    }
}

/// A memory cache over a bare disk store. The cache trusts what its fallback
/// returns (the stack checks it below), so damage is not part of this one.
final class WithCacheStorageContractTests: StorageContractTests {
    override func makeContract() throws -> StorageContract {
        let s = WithCacheStorage(cache: MemoryStorage(maxBytes: 8 << 20), fallback: try DiskStorage(root: scratch()))
        return StorageContract("WithCacheStorage(memory, disk)", s, traits: .init(canBeDamaged: false))
    }

    func testReadsFillTheCache() throws {
        let cache = MemoryStorage(maxBytes: 8 << 20)
        let disk = try DiskStorage(root: scratch())
        let s = WithCacheStorage(cache: cache, fallback: disk)
        let data = randomData(5000, seed: 3)
        let d = Digest.of(data)
        try disk.commitWrite(d, DataSource(data, verified: true))
        XCTAssertFalse(try cache.hasBlob(d))
        XCTAssertEqual(try s.getBlob(d)?.readAll(), data)
        XCTAssertEqual(try cache.getBlob(d)?.readAll(), data, "a read did not fill the cache")
    }
}

/// A memory cache over a verified disk store, as the stack builds it.
final class WithCacheVerifiedStorageContractTests: StorageContractTests {
    var cache: MemoryStorage!

    override func makeContract() throws -> StorageContract {
        let cache = MemoryStorage(maxBytes: 8 << 20)
        self.cache = cache
        let disk = try DiskStorage(root: scratch())
        let s = WithCacheStorage(cache: cache, fallback: VerifyingStorage(disk, sourceName: "disk", wholeCheckLimit: 64 << 10))
        return StorageContract("WithCacheStorage(memory, Verifying(disk))", s, traits: .init(verifiesReads: true)) { d in
            try cache.deleteBlob(d)
            try damageDiskObject(disk, d)
        }
    }

    /// Damaged fallback bytes never reach the cache.
    func testDamagedFallbackBytesAreNotCached() throws {
        try contract.damagedBytesNeverReturnedVerified()
        XCTAssertEqual(cache.usedBytes, 0, "the cache holds damaged bytes")
    }
}

/// A disk cache over a Redis index of another disk store (real
/// redis-server), both verified as the stack builds them.
final class DiskCacheOverIndexStorageContractTests: StorageContractTests {
    var redis: RedisServer?
    var cacheDisk: DiskStorage!
    var storage: WithCacheStorage!

    override func makeContract() throws -> StorageContract {
        let server = try RedisServer.unixSocket()
        redis = server
        cleanups.append { [weak self] in
            self?.redis?.stop()
            self?.redis = nil
        }
        let cacheDisk = try DiskStorage(root: scratch())
        self.cacheDisk = cacheDisk
        let store = try DiskStorage(root: scratch())
        let index = try RedisIndex(redis: server.pool(), storage: store)
        let s = WithCacheStorage(cache: VerifyingStorage(cacheDisk, sourceName: "cache", wholeCheckLimit: 64 << 10),
                                 fallback: VerifyingStorage(index, sourceName: "index", wholeCheckLimit: 64 << 10))
        storage = s
        return StorageContract("WithCacheStorage(disk, Verifying(RedisIndex(disk)))", s, traits: .init(verifiesReads: true)) { d in
            try damageDiskObject(cacheDisk, d)
            try damageDiskObject(store, d)
        }
    }

    /// A blob damaged in the cache only (larger than the whole-check limit,
    /// so the cache's check streams) is read back whole and right from the
    /// fallback, and the cache is repaired.
    func testDamageInTheCacheIsServedFromTheFallback() throws {
        let data = randomData(200_000, seed: 11)
        let d = Digest.of(data)
        try storage.commitWrite(d, DataSource(data, verified: true))
        try damageDiskObject(cacheDisk, d)
        XCTAssertEqual(try storage.getBlob(d)?.readAll(), data)
        XCTAssertEqual(try storage.read(d, offset: 1000, length: 10), data.subdata(in: 1000..<1010))
        XCTAssertEqual(try cacheDisk.getBlob(d)?.readAll(), data, "the cache was not refilled with the right bytes")
    }
}

final class VerifyingStorageContractTests: StorageContractTests {
    override func makeContract() throws -> StorageContract {
        let disk = try DiskStorage(root: scratch())
        self.disk = disk
        // A low whole-check limit: the 300 KB blob takes the streaming path.
        let s = VerifyingStorage(disk, sourceName: "disk", wholeCheckLimit: 64 << 10)
        return StorageContract("VerifyingStorage(disk)", s, traits: .init(verifiesReads: true)) { try damageDiskObject(disk, $0) }
    }

    var disk: DiskStorage!

    /// Damaged objects found by reads are removed from the store.
    func testDamagedObjectsAreRemoved() throws {
        try contract.damagedBytesNeverReturnedVerified()
        let left = try FileManager.default.subpathsOfDirectory(atPath: disk.root + "/cas/objects").filter { $0.count > 3 }
        XCTAssertEqual(left, [], "damaged objects left in the store")
    }
}

/// The stack a mount serves, as the configuration builds it:
/// WriteChecking → EmptyBlob → WithCache(memory, Verifying(RedisIndex(disk))).
final class FullStackStorageContractTests: StorageContractTests {
    var redis: RedisServer?
    var store = ""

    override func makeContract() throws -> StorageContract {
        let server = try RedisServer.unixSocket()
        redis = server
        cleanups.append { [weak self] in
            self?.redis?.stop()
            self?.redis = nil
        }
        store = scratch()
        let stack = try CasfsConfig.parse(yaml: """
            storage: !with-cache-storage
              cache: !lru-storage
                size: 8M
              fallback: !redis-index
                redis: !redis-connection
                  unix-socket: \(server.socketPath!)
                storage: !disk-storage
                  path: \(store)

            """)
        try stack.storage.start()
        cleanups.append { try? stack.stop() }
        let cache = try XCTUnwrap(stack.nodes["storage.cache"])
        let disk = try XCTUnwrap(stack.nodes["storage.fallback.storage"] as? DiskStorage)
        return StorageContract("full stack", stack.storage, traits: .init(emptyBlob: .alwaysPresent, verifiesReads: true)) { d in
            try cache.deleteBlob(d)
            try damageDiskObject(disk, d)
        }
    }

    /// The empty blob is answered at the top: it never reaches the index or the store.
    override func testEmptyBlob() throws {
        try super.testEmptyBlob()
        let key = "A:\(Digest.empty)"
        let exists = try XCTUnwrap(redis).pool().command("EXISTS", key)
        XCTAssertEqual(exists, .integer(0), "the empty blob was indexed")
        XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: store, .empty)), "the empty blob was stored")
    }
}
