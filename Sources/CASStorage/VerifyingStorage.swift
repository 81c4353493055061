import CASCore
import Foundation
import Synchronization

/// Checks bytes that come from a source casfs has not checked (a fallback, a
/// remote CAS, a store file casfs did not write or that changed since)
/// against their digest, so that no reader finishes with wrong bytes.
///
/// - A source that is already verified (a store file with a valid proof,
///   memory) passes through untouched: verification is paid once.
/// - Blobs up to `wholeCheckLimit` are hashed in full before the first byte
///   is served. Larger ones stream: bytes read in order from the start are
///   hashed as they pass; a read that reaches the end, or that jumps ahead,
///   returns only after the whole blob verified.
/// - Bytes that do not match are an error (`StorageError.corrupt`, EIO),
///   logged with the digest and the source, counted, and repaired: the blob
///   is deleted from the storage below (and so from its index), so the next
///   reader gets ENOENT or, through a cache's fallback, the right bytes.
/// - A verified file gets its proof recorded by the storage that holds it.
/// - A source that reads again at each call (a remote read range by range)
///   could answer differently the second time: the bytes it gave are kept
///   while they are hashed (in memory up to 4 MiB, else in an unnamed file)
///   and served from there, never fetched again unchecked.
public final class VerifyingStorage: StorageDecorator {
    public let inner: any Storage
    /// Names the source in logs and errors (e.g. `storage.fallback`).
    public let sourceName: String
    public let wholeCheckLimit: Int64
    /// How far past the hashed prefix a read may start and still count as
    /// part of an in-order stream. Bytes in the gap are read and hashed but
    /// served unverified, so it is 0 by default: any read that does not
    /// continue the hashed prefix waits for the whole check.
    public let streamWindow: Int64

    private let streams = Mutex<[Digest: WeakStreamCheck]>([:])
    /// Where the bytes of re-reading sources are kept while checked.
    let spoolDirectory: String
    let counters: Counters

    struct Counters: Sendable {
        let verifications, verifiedBytes, failures, repairs: MetricCounter
    }

    public init(_ inner: any Storage, sourceName: String, wholeCheckLimit: Int64 = 64 << 20,
                streamWindow: Int64 = 0, metrics: MetricScope = .standalone("verifying")) {
        self.inner = inner
        self.sourceName = sourceName
        self.wholeCheckLimit = wholeCheckLimit
        self.streamWindow = max(0, streamWindow)
        spoolDirectory = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        counters = Counters(verifications: metrics.counter(MetricCatalog.verifications),
                            verifiedBytes: metrics.counter(MetricCatalog.verifiedBytes),
                            failures: metrics.counter(MetricCatalog.verifyFailures),
                            repairs: metrics.counter(MetricCatalog.repairs))
    }

    public func getBlob(_ d: Digest) throws -> BlobSource? {
        guard let src = try inner.getBlob(d) else { return nil }
        if trusted(d, src) { return src }
        return try checkWhole(d, src)
    }

    public func openBlob(_ d: Digest) throws -> BlobSource? {
        guard let src = try inner.openBlob(d) else { return nil }
        if trusted(d, src) { return src }
        if d.size <= wholeCheckLimit { return try checkWhole(d, src) }
        return StreamCheckedSource(digest: d, source: src, check: try streamCheck(d, spooled: src.rereads), owner: self)
    }

    public func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        try openBlob(d)?.read(offset: offset, length: length)
    }

    public func bulkReadBlobs(_ ds: [Digest]) throws -> [Digest: Data] {
        var found = try inner.bulkReadBlobs(ds)
        for (d, data) in found {
            counters.verifications.add()
            counters.verifiedBytes.add(Int64(data.count))
            let actual = Digest.of(data)
            if actual != d {
                found[d] = nil
                failed(d, "bulk read returned \(actual)")
            }
        }
        return found
    }

    private func trusted(_ d: Digest, _ src: BlobSource) -> Bool { src.isVerified }

    /// Hashes all of `src`; returns it marked verified, or throws `corrupt`.
    /// A source that reads again at each call is copied while hashed, and
    /// the copy is what is returned.
    func checkWhole(_ d: Digest, _ src: BlobSource) throws -> BlobSource {
        counters.verifications.add()
        guard src.size == d.size else { throw failed(d, "\(src.size) bytes", read: src) }
        if src.rereads { return try checkCopying(d, src) }
        var h = DigestHasher()
        var buf = [UInt8](repeating: 0, count: Int(min(d.size, Int64(streamChunkSize))))
        var offset: Int64 = 0
        while offset < d.size {
            let n = try buf.withUnsafeMutableBytes { try src.read(into: $0, offset: offset) }
            guard n > 0 else { throw failed(d, "ended after \(offset) bytes", read: src) }
            buf.withUnsafeBytes { h.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            offset += Int64(n)
        }
        counters.verifiedBytes.add(d.size)
        let actual = h.finalize()
        guard actual == d else { throw failed(d, "content is \(actual)", read: src) }
        verified(d, src)
        return VerifiedSource(src)
    }

    /// `checkWhole` of a source that reads again at each call: its bytes are
    /// copied (memory up to 4 MiB, else an unnamed file) while hashed.
    private func checkCopying(_ d: Digest, _ src: BlobSource) throws -> BlobSource {
        var h = DigestHasher()
        let copy: BlobSource
        if d.size <= 4 << 20 {
            let data = try src.readAll()
            guard Int64(data.count) == d.size else { throw failed(d, "ended after \(data.count) bytes", read: src) }
            h.update(data)
            copy = DataSource(data)
        } else {
            let fd = try openAnonymousFile(in: spoolDirectory)
            let file = FileSource(fd: fd, size: d.size)
            var buf = [UInt8](repeating: 0, count: streamChunkSize)
            var offset: Int64 = 0
            while offset < d.size {
                let n = try buf.withUnsafeMutableBytes { try src.read(into: $0, offset: offset) }
                guard n > 0 else { throw failed(d, "ended after \(offset) bytes", read: src) }
                try buf.withUnsafeBytes { b in
                    let chunk = UnsafeRawBufferPointer(rebasing: b[0..<n])
                    h.update(chunk)
                    try pwriteFully(fd, chunk, offset)
                }
                offset += Int64(n)
            }
            copy = file
        }
        counters.verifiedBytes.add(d.size)
        let actual = h.finalize()
        guard actual == d else { throw failed(d, "content is \(actual)", read: src) }
        return VerifiedSource(copy)
    }

    func verified(_ d: Digest, _ src: BlobSource) {
        inner.recordVerified(d, src)
    }

    /// Logs, counts and repairs a mismatch; returns the error to throw.
    @discardableResult
    func failed(_ d: Digest, _ what: String, read src: BlobSource? = nil) -> StorageError {
        counters.failures.add()
        var repaired = "not removed"
        do {
            if let old = src as? StoreFile, let current = (try? inner.openBlob(d)) as? StoreFile,
               current.isVerified, current.stamp != old.stamp {
                // A verified rewrite replaced the damaged file since it was
                // opened: the new copy stays.
                repaired = "a verified copy replaced it meanwhile"
            } else {
                try inner.deleteBlob(d)
                counters.repairs.add()
                repaired = "removed"
            }
        } catch {
            repaired = "could not be removed: \(error)"
        }
        // A reader can ask again and again (a remote that keeps serving bad
        // bytes): one line per blob and minute, the rest counted.
        foldedLog.error(kind: "corrupt blob", key: d.description, "corrupt blob \(d) from \(sourceName): \(what); \(repaired)")
        return .corrupt(d, source: sourceName)
    }

    /// The check shared by the readers of `d`. `spooled`: its sources read
    /// again at each call, so the hashed bytes are kept in an unnamed file
    /// and later reads of them are served from it.
    private func streamCheck(_ d: Digest, spooled: Bool) throws -> StreamCheck {
        let spool = spooled ? try openAnonymousFile(in: spoolDirectory) : nil
        var unused = spool
        defer { if let fd = unused { close(fd) } }
        return streams.withLock { map in
            if let c = map[d]?.check, (c.spool != nil) == spooled { return c }
            if map.count > 1024 { map = map.filter { $0.value.check != nil } }
            let c = StreamCheck(size: d.size, spool: spool)
            unused = nil
            map[d] = WeakStreamCheck(check: c)
            return c
        }
    }
}

/// A source whose bytes were just verified.
struct VerifiedSource: BlobSource {
    let inner: BlobSource
    init(_ inner: BlobSource) { self.inner = inner }
    var size: Int64 { inner.size }
    var isVerified: Bool { true }
    var fileDescriptor: Int32? { inner.fileDescriptor }
    var heldBytes: Int64 { inner.heldBytes }
    func read(offset: Int64, length: Int) throws -> Data { try inner.read(offset: offset, length: length) }
    func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        try inner.read(into: buffer, offset: offset)
    }
}

struct WeakStreamCheck {
    weak var check: StreamCheck?
}

/// How far one large blob has been hashed, shared by every reader of it.
/// The condition guards the fields; the hasher belongs to the one reader
/// that is extending the hashed prefix (`extending`), which reads and
/// hashes without holding the lock.
final class StreamCheck: @unchecked Sendable {
    enum Outcome { case pending, verified, corrupt(StorageError) }
    let cond = NSCondition()
    // Guarded by `cond`.
    var hashedEnd: Int64 = 0
    var extending = false
    var outcome = Outcome.pending
    // Used only by the reader that set `extending`.
    var hasher = DigestHasher()
    let size: Int64
    /// An unnamed file holding the hashed bytes (sources that read again at
    /// each call): what later reads are served from. Owned.
    let spool: Int32?

    init(size: Int64, spool: Int32? = nil) {
        self.size = size
        self.spool = spool
    }

    deinit { if let spool { close(spool) } }

    /// Keeps hashed bytes (spooled checks only).
    func keep(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
        guard let spool else { return }
        try pwriteFully(spool, bytes, offset)
    }

    /// Hashed bytes: from the spool where there is one, else from `source`.
    func hashedBytes(_ source: BlobSource, into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        guard let spool else { return try source.read(into: buffer, offset: offset) }
        let n = Int(max(0, min(Int64(buffer.count), size - offset)))
        guard n > 0 else { return 0 }
        return try preadFully(spool, buffer.baseAddress!, n, offset)
    }
}

/// Reads of a large unverified blob. In-order reads are hashed as they pass
/// (the bytes served are the bytes hashed); the read that reaches the end,
/// or jumps ahead, returns only after the whole blob verified. Readers run
/// in parallel: one at a time extends the hashed prefix, without holding
/// the lock while it reads; the others read ranges already hashed on their
/// own, or wait only for the stretch they need, or read freely once the
/// blob is verified.
final class StreamCheckedSource: BlobSource, @unchecked Sendable {
    let digest: Digest
    let source: BlobSource
    let check: StreamCheck
    let owner: VerifyingStorage

    init(digest: Digest, source: BlobSource, check: StreamCheck, owner: VerifyingStorage) {
        self.digest = digest
        self.source = source
        self.check = check
        self.owner = owner
    }

    var size: Int64 { digest.size }
    var fileDescriptor: Int32? { nil }  // not handed to the kernel unverified
    var heldBytes: Int64 { source.heldBytes }

    func read(offset: Int64, length: Int) throws -> Data {
        var data = Data(count: max(0, Int(min(Int64(length), max(0, size - offset)))))
        let n = try data.withUnsafeMutableBytes { try read(into: $0, offset: offset) }
        if n < data.count { data.removeSubrange(n...) }
        return data
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        guard offset >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        guard offset < size, buffer.count > 0 else { return 0 }
        let end = offset.saturatingAdd(Int64(buffer.count)) >= size ? size : offset + Int64(buffer.count)
        check.cond.lock()
        while true {
            switch check.outcome {
            case .verified:
                check.cond.unlock()
                return try check.hashedBytes(source, into: buffer, offset: offset)
            case .corrupt(let e):
                check.cond.unlock()
                throw e
            case .pending: break
            }
            if end < size && end <= check.hashedEnd {
                // Hashed already (by an earlier reader): read it on our own.
                check.cond.unlock()
                return try check.hashedBytes(source, into: buffer, offset: offset)
            }
            if check.extending {
                check.cond.wait()
                continue
            }
            check.extending = true
            let hashedEnd = check.hashedEnd
            check.cond.unlock()
            if end < size && offset == hashedEnd {
                // The next bytes of an in-order stream: read once, hash, serve.
                return try extending {
                    let n = try source.read(into: buffer, offset: offset)
                    guard n == Int(end - offset) else { throw StreamFailure.damaged("short read at \(offset)") }
                    // Kept first: a failure to keep leaves the hasher where
                    // the hashed prefix ends (the next reader goes on from there).
                    try check.keep(UnsafeRawBufferPointer(rebasing: buffer[0..<n]), at: offset)
                    check.hasher.update(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
                    owner.counters.verifiedBytes.add(Int64(n))
                    advance(to: end)
                    return n
                }
            }
            // A read near the hashed prefix waits for the bytes up to it; the
            // end of the blob, or a jump, waits for the whole check.
            let target = end < size && offset <= hashedEnd.saturatingAdd(owner.streamWindow) ? end : size
            try extending { try extend(to: target) }
            check.cond.lock()
        }
    }

    enum StreamFailure: Error { case damaged(String) }

    /// Runs `body` as the extender; clears `extending` afterwards. A
    /// mismatch found there fails the blob (repaired outside any lock).
    private func extending<T>(_ body: () throws -> T) throws -> T {
        do {
            let v = try body()
            release()
            return v
        } catch StreamFailure.damaged(let what) {
            throw fail(what)
        } catch {
            // An I/O error: the blob is not judged; a later reader tries again.
            release()
            throw error
        }
    }

    private func release() {
        check.cond.lock()
        check.extending = false
        check.cond.broadcast()
        check.cond.unlock()
    }

    private func advance(to end: Int64) {
        check.cond.lock()
        check.hashedEnd = end
        check.cond.broadcast()
        check.cond.unlock()
    }

    /// Hashes from the hashed prefix up to `end` (as the extender), and at
    /// the end of the blob settles its outcome.
    private func extend(to end: Int64) throws {
        var buf = [UInt8](repeating: 0, count: 4 << 20)
        var at = check.cond.withLock { check.hashedEnd }
        while at < end {
            let want = Int(min(Int64(buf.count), end - at))
            let n = try buf.withUnsafeMutableBytes {
                try source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<want]), offset: at)
            }
            guard n == want else { throw StreamFailure.damaged("short read at \(at)") }
            try buf.withUnsafeBytes {
                try check.keep(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: at)
                check.hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<n]))
            }
            at += Int64(n)
            owner.counters.verifiedBytes.add(Int64(n))
            advance(to: at)
        }
        guard end == size else { return }
        let actual = check.hasher.finalize()
        owner.counters.verifications.add()
        guard actual == digest else { throw StreamFailure.damaged("content is \(actual)") }
        check.cond.lock()
        check.outcome = .verified
        check.cond.unlock()
        owner.verified(digest, source)
    }

    /// Marks the blob corrupt for every reader, then logs, counts and
    /// repairs it (storage I/O, with no lock held).
    private func fail(_ what: String) -> StorageError {
        let e = StorageError.corrupt(digest, source: owner.sourceName)
        check.cond.lock()
        check.outcome = .corrupt(e)
        check.extending = false
        check.cond.broadcast()
        check.cond.unlock()
        return owner.failed(digest, what, read: source)
    }
}
