import CASCore
import CASStorage
import Foundation
import Synchronization
import XCTest

/// A storage like a remote CAS read range by range: `openBlob` gives a
/// source that asks again at every read, and answers with damaged bytes
/// once `goodReads` reads were answered right.
private final class FickleRemote: StorageDecorator, Sendable {
    let inner: any Storage
    let goodReads: Atomic<Int>
    let reads = Atomic<Int>(0)
    init(_ inner: any Storage, goodReads: Int) {
        self.inner = inner
        self.goodReads = Atomic(goodReads)
    }

    /// Every later read is damaged.
    func spoil() { goodReads.store(reads.load(ordering: .relaxed), ordering: .relaxed) }

    func openBlob(_ d: Digest) throws -> BlobSource? {
        guard let held = try inner.getBlob(d) else { return nil }
        let data = try held.readAll()
        return RangeSource(size: d.size) { [self] offset, length in
            var out = data.subdata(in: Int(offset)..<Int(offset) + length)
            if reads.add(1, ordering: .relaxed).newValue > goodReads.load(ordering: .relaxed), !out.isEmpty { out[0] ^= 0xff }
            return out
        }
    }

    func getBlob(_ d: Digest) throws -> BlobSource? { try openBlob(d) }
}

/// Bytes from a source that reads again at each call are served from the
/// copy that was hashed, never fetched again unchecked.
final class RereadingSourceTests: XCTestCase {
    private func stored(_ size: Int) throws -> (MemoryStorage, Digest, Data) {
        let memory = MemoryStorage(maxBytes: 64 << 20)
        var data = Data(count: size)
        for i in 0..<size { data[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i >> 9) }
        let d = Digest.of(data)
        try memory.commitWrite(d, DataSource(data))
        return (memory, d, data)
    }

    /// Whole checks: small (copied into memory) and larger (into a file).
    func testWholeCheckServesTheBytesItHashed() throws {
        for size in [100_000, 6 << 20] {
            let (memory, d, data) = try stored(size)
            let remote = FickleRemote(memory, goodReads: Int.max)
            let v = VerifyingStorage(remote, sourceName: "remote")
            let src = try XCTUnwrap(v.openBlob(d))
            // From here on the remote answers wrong: nothing read later may show it.
            remote.spoil()
            XCTAssertTrue(src.isVerified)
            XCTAssertEqual(try src.readAll(), data, "size \(size)")
            XCTAssertEqual(try src.read(offset: 10, length: 20), data.subdata(in: 10..<30))
        }
    }

    /// A second open is checked again: a remote that answered right once is
    /// not trusted for its later answers.
    func testAVerifiedRemoteBlobIsNotTrustedOnItsNextAnswers() throws {
        let (memory, d, data) = try stored(200_000)
        let remote = FickleRemote(memory, goodReads: 1)  // the whole first read, then damage
        let v = VerifyingStorage(remote, sourceName: "remote")
        XCTAssertEqual(try v.openBlob(d)?.readAll(), data)
        XCTAssertThrowsError(try v.openBlob(d)) { e in
            guard case .corrupt = StorageError.wrap(e) else { return XCTFail("\(e)") }
        }
    }

    /// Streamed checks (blobs over the whole-check limit): once the blob is
    /// verified, reads anywhere in it are served from what was hashed, also
    /// through later opens that share the check.
    func testStreamCheckServesHashedBytesAfterward() throws {
        let size = 3 << 20
        let (memory, d, data) = try stored(size)
        let reads = 24  // 128 KiB reads in order: hashed as they pass
        let remote = FickleRemote(memory, goodReads: reads)
        let v = VerifyingStorage(remote, sourceName: "remote", wholeCheckLimit: 1 << 20)
        let src = try XCTUnwrap(v.openBlob(d))
        XCTAssertFalse(src.isVerified)
        var got = Data()
        while got.count < size { got += try src.read(offset: Int64(got.count), length: 128 << 10) }
        XCTAssertEqual(got, data)
        XCTAssertEqual(remote.reads.load(ordering: .relaxed), reads)
        // The remote now answers wrong; re-reads come from the hashed copy.
        XCTAssertEqual(try src.read(offset: 1000, length: 5000), data.subdata(in: 1000..<6000))
        XCTAssertEqual(try src.read(offset: Int64(size - 10), length: 10), data.subdata(in: (size - 10)..<size))
        XCTAssertEqual(remote.reads.load(ordering: .relaxed), reads, "nothing fetched again")
    }
}
