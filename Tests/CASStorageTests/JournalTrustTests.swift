import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

/// The deferred-write journal treats its directory as untrusted input.
final class JournalTrustTests: XCTestCase {
    typealias Flaky = DeferredWriteJournalTests.Flaky

    /// A fallback that refuses every write for good.
    final class Refusing: Storage, Sendable {
        let attempts = Atomic<Int>(0)
        func hasBlob(_ d: Digest) throws -> Bool { false }
        func getBlob(_ d: Digest) throws -> BlobSource? { nil }
        func deleteBlob(_ d: Digest) throws {}
        func commitWrite(_ d: Digest, _ s: BlobSource) throws {
            attempts.add(1, ordering: .relaxed)
            throw StorageError.rejected("data does not match the digest")
        }
    }

    func damage(_ path: String, at offset: Int64 = 3) throws {
        let fd = open(path, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        var b: UInt8 = 0
        XCTAssertEqual(pread(fd, &b, 1, off_t(offset)), 1)
        b ^= 0xff
        XCTAssertEqual(pwrite(fd, &b, 1, off_t(offset)), 1)
    }

    func aside(_ dir: String, _ sub: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir + "/" + sub)) ?? []).sorted()
    }

    func testEditedEntryIsNeitherServedNorSent() throws {
        let dir = tempDir() + "/journal"
        let m = MetricScope.standalone("j")
        let fallback = Flaky(MemoryStorage(maxBytes: 1 << 20))
        let j = try DeferredWriteJournal(directory: dir, threads: 1, maxBackoff: 0.1, metrics: m)
        j.start(sendingTo: fallback)
        let (d, data) = blob("journaled, then edited")
        try j.add(d, DataSource(data, verified: true))
        XCTAssertEqual(try j.source(d)?.readAll(), data)
        try damage(dir + "/" + d.description)
        XCTAssertNil(j.source(d), "an edited entry was served")
        XCTAssertFalse(j.contains(d), "the damaged write is still queued")
        XCTAssertEqual(m.value(MetricCatalog.journalDamaged), 1)
        XCTAssertEqual(aside(dir, "damaged").count, 1)
        fallback.failing.store(false, ordering: .relaxed)
        usleep(300_000)
        XCTAssertFalse(try fallback.hasBlob(d), "the damaged entry was sent")
        j.stop()
    }

    func testEditedEntryIsReplacedByAProvenCopy() throws {
        let dir = tempDir() + "/journal"
        let fallback = Flaky(MemoryStorage(maxBytes: 1 << 20))
        let j = try DeferredWriteJournal(directory: dir, threads: 1, maxBackoff: 0.1)
        let (d, data) = blob("the cache still has me")
        j.start(sendingTo: fallback, repairSource: { $0 == d ? DataSource(data, verified: true) : nil })
        try j.add(d, DataSource(data, verified: true))
        try damage(dir + "/" + d.description)
        fallback.failing.store(false, ordering: .relaxed)
        XCTAssertTrue(waitUntil { j.pending == 0 })
        XCTAssertEqual(try fallback.getBlob(d)?.readAll(), data, "the fallback did not get the proven bytes")
        j.stop()
    }

    func testEntryChangedWhileOpenIsNotRead() throws {
        let dir = tempDir() + "/journal"
        let j = try DeferredWriteJournal(directory: dir, threads: 1)
        j.start(sendingTo: Flaky(MemoryStorage(maxBytes: 1 << 20)))
        let (d, data) = blob("read, then changed under the reader")
        try j.add(d, DataSource(data, verified: true))
        let src = try XCTUnwrap(j.source(d))
        XCTAssertEqual(try src.read(offset: 0, length: 4), data.prefix(4))
        try damage(dir + "/" + d.description)
        XCTAssertThrowsError(try src.read(offset: 0, length: 4)) { e in
            guard case StorageError.corrupt = e else { return XCTFail("\(e)") }
        }
        j.stop(timeout: 0)
    }

    func testPlantedEntriesAreRefused() throws {
        let dir = tempDir() + "/journal"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let passwd = try Data(contentsOf: URL(fileURLWithPath: "/etc/passwd"))
        let pd = Digest.of(passwd)
        XCTAssertEqual(symlink("/etc/passwd", dir + "/" + pd.description), 0)
        let (zd, _) = blob("some other bytes of this length")
        try Data(count: Int(zd.size)).write(to: URL(fileURLWithPath: dir + "/" + zd.description))
        let (hd, hdata) = blob("a hard link")
        let other = tempDir() + "/elsewhere"
        try hdata.write(to: URL(fileURLWithPath: other))
        XCTAssertEqual(link(other, dir + "/" + hd.description), 0)
        let m = MetricScope.standalone("j")
        let fallback = Flaky(MemoryStorage(maxBytes: 1 << 20))
        fallback.failing.store(false, ordering: .relaxed)
        let j = try DeferredWriteJournal(directory: dir, threads: 1, metrics: m)
        j.start(sendingTo: fallback)
        XCTAssertTrue(waitUntil { j.pending == 0 && m.value(MetricCatalog.journalDamaged) == 3 })
        for d in [pd, zd, hd] {
            XCTAssertFalse(try fallback.hasBlob(d), "\(d) was sent")
            XCTAssertNil(j.source(d))
        }
        XCTAssertEqual(aside(dir, "damaged").count, 3)
        j.stop()
    }

    func testUnsafeDirectoryIsRefused() throws {
        let dir = tempDir() + "/journal"
        _ = try DeferredWriteJournal(directory: dir)
        chmod(dir, 0o777)
        XCTAssertThrowsError(try DeferredWriteJournal(directory: dir)) { e in
            XCTAssertTrue("\(e)".contains("writable by group or others (mode 777)"), "\(e)")
        }
        chmod(dir, 0o700)
        XCTAssertEqual(chown(dir, 65534, 65534), 0)
        XCTAssertThrowsError(try DeferredWriteJournal(directory: dir)) { e in
            XCTAssertTrue("\(e)".contains("owned by uid 65534"), "\(e)")
        }
    }

    func testRefusedSendIsNotRetriedForever() throws {
        let dir = tempDir() + "/journal"
        let m = MetricScope.standalone("j")
        let fallback = Refusing()
        let j = try DeferredWriteJournal(directory: dir, threads: 1, maxBackoff: 0.05, metrics: m)
        j.start(sendingTo: fallback)
        let (d, data) = blob("the fallback will never take me")
        try j.add(d, DataSource(data, verified: true))
        XCTAssertTrue(waitUntil { j.pending == 0 }, "still retried")
        usleep(300_000)
        XCTAssertEqual(fallback.attempts.load(ordering: .relaxed), DeferredWriteJournal.maxRefusals)
        XCTAssertEqual(m.value(MetricCatalog.deferredRefused), 1)
        XCTAssertEqual(aside(dir, "refused").count, 1)
        j.stop()
    }
}
