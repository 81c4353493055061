import CASCore
import CASStorage
import Foundation
import Synchronization

func blob(_ s: String) -> (Digest, Data) {
    let d = Data(s.utf8)
    return (Digest.of(d), d)
}

func tempDir(_ name: String = #function) -> String {
    let safe = name.filter { $0.isLetter || $0.isNumber }
    let path = NSTemporaryDirectory() + "casfs-test-\(safe)-\(UUID().uuidString)"
    try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// Wraps a storage, counting calls and failing on demand.
final class InstrumentedStorage: Storage, Sendable {
    let inner: any Storage
    let failReads = Atomic<Bool>(false)
    let failWrites = Atomic<Bool>(false)
    let failDeletes = Atomic<Bool>(false)
    let getCalls = Atomic<Int>(0)
    let writeCalls = Atomic<Int>(0)
    /// Delay each getBlob by this many milliseconds (to overlap concurrent misses).
    let getDelayMs = Atomic<Int>(0)
    /// Corrupt what getBlob returns (flip the first byte).
    let corrupt = Atomic<Bool>(false)
    /// When set, getBlob waits for a signal on this before answering.
    let gate = Mutex<DispatchSemaphore?>(nil)

    init(_ inner: any Storage) { self.inner = inner }

    func hasBlob(_ d: Digest) throws -> Bool {
        if failReads.load(ordering: .relaxed) { throw StorageError.unavailable("injected read failure") }
        return try inner.hasBlob(d)
    }

    func getBlob(_ d: Digest) throws -> BlobSource? {
        getCalls.add(1, ordering: .relaxed)
        let delay = getDelayMs.load(ordering: .relaxed)
        if delay > 0 { usleep(useconds_t(delay * 1000)) }
        if let g = gate.withLock({ $0 }) { g.wait() }
        if failReads.load(ordering: .relaxed) { throw StorageError.unavailable("injected read failure") }
        guard let src = try inner.getBlob(d) else { return nil }
        if corrupt.load(ordering: .relaxed), src.size > 0 {
            var data = try src.readAll()
            data[data.startIndex] ^= 0xff
            return DataSource(data)
        }
        return src
    }

    let bulkReadCalls = Atomic<Int>(0)

    /// One call to the inner storage's bulk read (counted; corrupted on demand).
    func bulkReadBlobs(_ digests: [Digest]) throws -> [Digest: Data] {
        bulkReadCalls.add(1, ordering: .relaxed)
        if let g = gate.withLock({ $0 }) { g.wait() }
        if failReads.load(ordering: .relaxed) { throw StorageError.unavailable("injected read failure") }
        var out = try inner.bulkReadBlobs(digests)
        if corrupt.load(ordering: .relaxed) {
            for (d, data) in out where !data.isEmpty {
                var bad = data
                bad[bad.startIndex] ^= 0xff
                out[d] = bad
            }
        }
        return out
    }

    /// Handles for ranged reads pass straight through (not gated, not counted
    /// as fetches), like `read`.
    func openBlob(_ d: Digest) throws -> BlobSource? {
        if failReads.load(ordering: .relaxed) { throw StorageError.unavailable("injected read failure") }
        return try inner.openBlob(d)
    }

    /// Ranged reads pass straight through (not gated, not counted as fetches).
    func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        if failReads.load(ordering: .relaxed) { throw StorageError.unavailable("injected read failure") }
        return try inner.read(d, offset: offset, length: length)
    }

    func deleteBlob(_ d: Digest) throws {
        if failDeletes.load(ordering: .relaxed) { throw StorageError.unavailable("injected delete failure") }
        try inner.deleteBlob(d)
    }

    func recordVerified(_ d: Digest, _ s: BlobSource) { inner.recordVerified(d, s) }

    func commitWrite(_ d: Digest, _ s: BlobSource) throws {
        writeCalls.add(1, ordering: .relaxed)
        if failWrites.load(ordering: .relaxed) { throw StorageError.storageFull("injected write failure") }
        try inner.commitWrite(d, s)
    }
}
