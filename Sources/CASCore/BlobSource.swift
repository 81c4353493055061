import Foundation

/// A readable, seekable blob. Large blobs are backed by files, never held whole in memory.
public protocol BlobSource: Sendable {
    /// Length in bytes.
    var size: Int64 { get }
    /// Up to `length` bytes from `offset`; fewer only at the end of the blob.
    func read(offset: Int64, length: Int) throws -> Data
    /// Reads up to `buffer.count` bytes at `offset` into `buffer`; fewer only
    /// at the end of the blob. Returns how many.
    func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int
    /// True when these bytes are known to hash to the blob's digest: casfs
    /// wrote or verified them, and (for a file) nothing changed it since.
    var isVerified: Bool { get }
    /// A descriptor of a local file that holds exactly the blob's bytes, when
    /// the source is one (the kernel can then read it directly).
    var fileDescriptor: Int32? { get }
    /// The digest of these bytes, when casfs computed it while they were written.
    var computedDigest: Digest? { get }
    /// How many bytes this source keeps in memory (by default: all of them,
    /// unless it reads a file).
    var heldBytes: Int64 { get }
}

extension BlobSource {
    public var isVerified: Bool { false }
    public var fileDescriptor: Int32? { nil }
    public var computedDigest: Digest? { nil }
    public var heldBytes: Int64 { fileDescriptor == nil ? size : 0 }
    /// True when each read asks the origin again (a remote read range by
    /// range): two reads of one range need not return the same bytes.
    public var rereads: Bool { fileDescriptor == nil && heldBytes == 0 }

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        let data = try read(offset: offset, length: buffer.count)
        data.copyBytes(to: buffer)
        return data.count
    }
}

/// Chunk size used when streaming sources (copying, hashing).
public let streamChunkSize = 1 << 20

extension BlobSource {
    /// All bytes. Only for blobs known to be small (batch APIs, tests).
    public func readAll() throws -> Data {
        guard size <= Int64(Int.max) else { throw StorageError.unsupported("blob too large for memory") }
        var out = Data()
        out.reserveCapacity(Int(size))
        try forEachChunk { out.append($0) }
        return out
    }

    /// Calls `body` with consecutive chunks covering the whole blob.
    public func forEachChunk(_ chunkSize: Int = streamChunkSize, _ body: (Data) throws -> Void) throws {
        var offset: Int64 = 0
        while offset < size {
            let n = Int(min(Int64(chunkSize), size - offset))
            let chunk = try read(offset: offset, length: n)
            guard chunk.count == n else {
                throw StorageError.io(errno: EIO, "short read at \(offset): \(chunk.count) of \(n) bytes")
            }
            try body(chunk)
            offset += Int64(n)
        }
    }

    /// Hashes the whole source in one pass.
    public func computeDigest() throws -> Digest {
        var h = DigestHasher()
        try forEachChunk { h.update($0) }
        return h.finalize()
    }

    /// Throws `digestMismatch` unless the bytes hash to `digest` with its length.
    public func verify(_ digest: Digest) throws {
        guard size == digest.size else {
            throw StorageError.sizeMismatch(expected: digest, actualSize: size)
        }
        let actual = try computedDigest ?? computeDigest()
        guard actual == digest else { throw StorageError.digestMismatch(expected: digest, actual: actual) }
    }
}

/// A blob held in memory.
public struct DataSource: BlobSource {
    public let data: Data
    public let isVerified: Bool
    /// `verified`: the bytes are known to match the digest they are served for.
    public init(_ data: Data, verified: Bool = false) {
        self.data = data
        self.isVerified = verified
    }
    public var size: Int64 { Int64(data.count) }
    public func read(offset: Int64, length: Int) throws -> Data {
        guard offset >= 0, length >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        let start = Int(min(offset, Int64(data.count)))
        let end = min(start + length, data.count)
        let base = data.startIndex
        return data.subdata(in: (base + start)..<(base + end))
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        guard offset >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        let start = Int(min(offset, Int64(data.count)))
        let n = min(buffer.count, data.count - start)
        guard n > 0 else { return 0 }
        let base = data.startIndex + start
        data.copyBytes(to: buffer, from: base..<(base + n))
        return n
    }
}

/// A blob backed by an open file descriptor, read with pread. Owns the descriptor.
public final class FileSource: BlobSource {
    public let fd: Int32
    public let size: Int64
    public let isVerified: Bool
    public let computedDigest: Digest?
    public var fileDescriptor: Int32? { fd }

    /// Opens `path` read-only. Throws `io(ENOENT)` when absent.
    public convenience init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw StorageError.posix("open \(path)") }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = StorageError.posix("fstat \(path)")
            close(fd)
            throw e
        }
        self.init(fd: fd, size: Int64(st.st_size))
    }

    /// Takes ownership of `fd`. `verified`: its bytes are known to match the
    /// digest it is served for; `computedDigest`: what they hash to, when known.
    public init(fd: Int32, size: Int64, verified: Bool = false, computedDigest: Digest? = nil) {
        self.fd = fd
        self.size = size
        self.isVerified = verified
        self.computedDigest = computedDigest
    }

    deinit { close(fd) }

    public func read(offset: Int64, length: Int) throws -> Data {
        try preadData(fd, size: size, offset: offset, length: length)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        guard offset >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        let n = Int(max(0, min(Int64(buffer.count), size - offset)))
        if n == 0 { return 0 }
        return try preadFully(fd, buffer.baseAddress!, n, offset)
    }
}

/// A blob read range by range through a closure (a remote blob, say), with
/// nothing held: each read asks again.
public struct RangeSource: BlobSource {
    public let size: Int64
    public var heldBytes: Int64 { 0 }
    private let reader: @Sendable (Int64, Int) throws -> Data

    public init(size: Int64, reader: @escaping @Sendable (_ offset: Int64, _ length: Int) throws -> Data) {
        self.size = size
        self.reader = reader
    }

    public func read(offset: Int64, length: Int) throws -> Data {
        guard offset >= 0, length >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        guard offset < size, length > 0 else { return Data() }
        return try reader(offset, Int(min(Int64(length), size - offset)))
    }
}

/// Up to `length` bytes at `offset` of the file `fd` of `size` bytes
/// (fewer only at its end).
public func preadData(_ fd: Int32, size: Int64, offset: Int64, length: Int) throws -> Data {
    guard offset >= 0, length >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
    let n = Int(max(0, min(Int64(length), size - offset)))
    if n == 0 { return Data() }
    var data = Data(count: n)
    let got = try data.withUnsafeMutableBytes { buf -> Int in
        try preadFully(fd, buf.baseAddress!, n, offset)
    }
    if got < n { data.removeSubrange(got..<n) }
    return data
}

/// pread until `count` bytes or end of file; retries on EINTR.
public func preadFully(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, _ offset: Int64) throws -> Int {
    var done = 0
    while done < count {
        let r = pread(fd, buf + done, count - done, off_t(offset) + off_t(done))
        if r < 0 {
            if errno == EINTR { continue }
            throw StorageError.posix("pread")
        }
        if r == 0 { break }
        done += r
    }
    return done
}

/// pwrite until all bytes are written at `offset`; retries on EINTR.
public func pwriteFully(_ fd: Int32, _ buf: UnsafeRawBufferPointer, _ offset: Int64) throws {
    var done = 0
    while done < buf.count {
        let r = pwrite(fd, buf.baseAddress! + done, buf.count - done, off_t(offset) + off_t(done))
        if r < 0 {
            if errno == EINTR { continue }
            throw StorageError.posix("pwrite")
        }
        done += r
    }
}

/// write until all bytes are written; retries on EINTR.
public func writeFully(_ fd: Int32, _ buf: UnsafeRawBufferPointer) throws {
    var done = 0
    while done < buf.count {
        let r = write(fd, buf.baseAddress! + done, buf.count - done)
        if r < 0 {
            if errno == EINTR { continue }
            throw StorageError.posix("write")
        }
        done += r
    }
}

/// Opens a new file in `directory` that has no name (O_TMPFILE, or mkstemp then
/// unlink where the filesystem lacks O_TMPFILE): it vanishes when closed, so a
/// crash leaves nothing behind. Returns the descriptor, open for reading and writing.
public func openAnonymousFile(in directory: String) throws -> Int32 {
    let oTmpfile: Int32 = 0o20_000_000 | O_DIRECTORY  // Linux __O_TMPFILE | O_DIRECTORY
    let fd = open(directory, oTmpfile | O_RDWR | O_CLOEXEC, 0o600)
    if fd >= 0 { return fd }
    var template = Array("\(directory)/.casfs-tmp-XXXXXX".utf8CString)
    let fd2 = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
    guard fd2 >= 0 else { throw StorageError.posix("temporary file in \(directory)") }
    template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
    _ = fcntl(fd2, F_SETFD, FD_CLOEXEC)
    return fd2
}
