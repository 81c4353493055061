import CASCore
import CASStorage
import Foundation
import Redis
import Synchronization
import XCTest

/// A blob and its digest.
func blob(_ text: String) -> (Digest, Data) {
    let data = Data(text.utf8)
    return (Digest.of(data), data)
}

func blob(bytes count: Int, seed: UInt8) -> (Digest, Data) {
    let data = Data((0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) })
    return (Digest.of(data), data)
}

/// An in-memory storage that counts calls and can be told to fail.
final class FakeStorage: Storage, Sendable {
    struct State {
        var blobs: [Digest: Data] = [:]
        var writes = 0
        var failWrites = Set<Digest>()
        var failDeletes = Set<Digest>()
    }
    let state = Mutex(State())
    /// Runs inside deleteBlob, before the bytes go (to stage races).
    let onDelete = Mutex<(@Sendable (Digest) -> Void)?>(nil)

    var writes: Int { state.withLock { $0.writes } }
    func contains(_ d: Digest) -> Bool { state.withLock { $0.blobs[d] != nil } }
    func remove(_ d: Digest) { state.withLock { _ = $0.blobs.removeValue(forKey: d) } }
    func failWrite(_ d: Digest) { state.withLock { _ = $0.failWrites.insert(d) } }
    func failDelete(_ d: Digest) { state.withLock { _ = $0.failDeletes.insert(d) } }

    func hasBlob(_ digest: Digest) throws -> Bool { contains(digest) }

    func getBlob(_ digest: Digest) throws -> BlobSource? {
        state.withLock { $0.blobs[digest] }.map { DataSource($0, verified: true) }
    }

    func skipsWrite(_ digest: Digest, _ source: BlobSource) throws -> Bool { contains(digest) }

    func deleteBlob(_ digest: Digest) throws {
        onDelete.withLock { $0 }?(digest)
        try state.withLock { s in
            if s.failDeletes.contains(digest) { throw StorageError.io(errno: EACCES, "cannot delete \(digest)") }
            s.blobs.removeValue(forKey: digest)
        }
    }

    func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        let data = try source.readAll()
        try state.withLock { s in
            if s.failWrites.contains(digest) { throw StorageError.storageFull("no room for \(digest)") }
            s.writes += 1
            s.blobs[digest] = data
        }
    }
}

/// Raw Redis access for assertions.
extension RedisPool {
    func get(_ key: String) throws -> String? { try command("GET", key).string }
    func ttl(_ key: String) throws -> Int64 { try command("TTL", key).integerValue() }
    func exists(_ key: String) throws -> Bool { try command("EXISTS", key).integerValue() == 1 }
    /// Makes `key` look last accessed `seconds` ago.
    func age(_ key: String, by seconds: Int64) throws {
        XCTAssertEqual(try command(["EXPIRE", .string(key), .integer(RedisIndex.ttlSeconds - seconds)]), .integer(1), "aging \(key)")
    }
}
