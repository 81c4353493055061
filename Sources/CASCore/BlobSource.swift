import Foundation

/// A readable, seekable blob. Large blobs are backed by files, never held whole in memory.
public protocol BlobSource: Sendable {
    /// Length in bytes.
    var size: Int64 { get }
    /// Up to `length` bytes from `offset`; fewer only at the end of the blob.
    func read(offset: Int64, length: Int) throws -> Data
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
        let actual = try computeDigest()
        guard actual == digest else { throw StorageError.digestMismatch(expected: digest, actual: actual) }
    }
}

/// A blob held in memory.
public struct DataSource: BlobSource {
    public let data: Data
    public init(_ data: Data) { self.data = data }
    public var size: Int64 { Int64(data.count) }
    public func read(offset: Int64, length: Int) throws -> Data {
        guard offset >= 0, length >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        let start = Int(min(offset, Int64(data.count)))
        let end = min(start + length, data.count)
        let base = data.startIndex
        return data.subdata(in: (base + start)..<(base + end))
    }
}

/// A blob backed by an open file descriptor, read with pread. Owns the descriptor.
public final class FileSource: BlobSource {
    public let fd: Int32
    public let size: Int64

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

    /// Takes ownership of `fd`.
    public init(fd: Int32, size: Int64) {
        self.fd = fd
        self.size = size
    }

    deinit { close(fd) }

    public func read(offset: Int64, length: Int) throws -> Data {
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
