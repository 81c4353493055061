import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

/// Bytes handed out in small pieces with a pause after each, so writers of
/// the same blob overlap.
struct TricklingSource: BlobSource {
    let data: Data
    var size: Int64 { Int64(data.count) }
    var isVerified: Bool { true }

    func read(offset: Int64, length: Int) throws -> Data {
        guard offset >= 0, length >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        let start = Int(min(offset, size))
        let end = min(start + length, data.count)
        usleep(200)
        return data.subdata(in: start..<end)
    }
}

/// Concurrent adds of one blob to the deferred-write journal.
final class JournalConcurrentAddTests: XCTestCase {
    typealias Flaky = DeferredWriteJournalTests.Flaky

    func pattern(_ count: Int, seed: Int) -> Data {
        var bytes = [UInt8](repeating: 0, count: count)
        var x = UInt64(truncatingIfNeeded: seed) &* 0x9E37_79B9_7F4A_7C15 | 1
        for i in bytes.indices {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            bytes[i] = UInt8(truncatingIfNeeded: x)
        }
        return Data(bytes)
    }

    func partials(_ dir: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.contains(".partial") }
    }


    /// Eight threads add one blob at once, in many rounds, first with the
    /// fallback down (the entries stay), then with it up (sends and
    /// removals race with the adds): no add fails, every entry hashes to
    /// its name, none is found damaged, and the fallback ends up with
    /// every blob.
    func testConcurrentAddsOfOneBlobJournalItWhole() throws {
        let dir = tempDir() + "/journal"
        let m = MetricScope.standalone("j")
        let fallback = Flaky(MemoryStorage(maxBytes: 1 << 30))
        let j = try DeferredWriteJournal(directory: dir, threads: 2, maxBackoff: 0.05, metrics: m)
        j.start(sendingTo: fallback)
        var all: [(Digest, Data)] = []
        for phase in 0..<2 {
            if phase == 1 { fallback.failing.store(false, ordering: .relaxed) }
            for round in 0..<12 {
                let data = pattern((1 << 18) + round * 4099, seed: phase * 100 + round)
                let d = Digest.of(data)
                all.append((d, data))
                let failures = Mutex<[String]>([])
                DispatchQueue.concurrentPerform(iterations: 8) { _ in
                    do { try j.add(d, TricklingSource(data: data)) } catch {
                        failures.withLock { $0.append("\(error)") }
                    }
                }
                XCTAssertEqual(failures.withLock { $0 }, [], "an add of \(d) failed")
                if phase == 0 {
                    XCTAssertTrue(j.contains(d), "the write of \(d) is not queued")
                    let entry = try Data(contentsOf: URL(fileURLWithPath: dir + "/" + d.description))
                    XCTAssertEqual(Digest.of(entry), d, "the journal entry of \(d) is torn")
                    XCTAssertEqual(try j.source(d)?.readAll(), data)
                }
            }
        }
        XCTAssertTrue(waitUntil { j.pending == 0 }, "\(j.pending) writes never reached the fallback")
        XCTAssertEqual(m.value(MetricCatalog.journalDamaged), 0, "an entry was found damaged")
        for (d, data) in all {
            XCTAssertEqual(try fallback.getBlob(d)?.readAll(), data, "the deferred write of \(d) was lost")
        }
        XCTAssertEqual(partials(dir), [], "temporary files were left behind")
        j.stop()
    }

    /// A temporary of a writer that died is removed when the journal starts.
    func testLeftoverTemporariesAreRemovedAtStart() throws {
        let dir = tempDir() + "/journal"
        let (d, data) = blob("left half-written")
        let j = try DeferredWriteJournal(directory: dir, threads: 1)
        let leftover = dir + "/" + d.description + ".partial.Ab12Cd"
        try data.prefix(4).write(to: URL(fileURLWithPath: leftover))
        j.start(sendingTo: MemoryStorage(maxBytes: 1 << 20))
        XCTAssertFalse(FileManager.default.fileExists(atPath: leftover))
        XCTAssertEqual(j.pending, 0, "a temporary was taken for an entry")
        j.stop()
    }
}
