import CASCore
import CLinux
import Foundation
import Synchronization

/// Blobs as files in BuildGrid's on-disk layout, so casfs can serve an existing
/// BuildGrid disk store: `<root>/cas/objects/<hash[0:2]>/<hash[2:]>`, temporaries
/// in `<root>/tmp`. A commit writes a temporary file and links it into place, so
/// a crash never leaves a partial object visible. A file whose length differs
/// from the digest's size is not that blob.
///
/// A file casfs wrote or verified carries a proof (`user.casfs.verified`:
/// digest, inode and modification time), so it is not hashed again after a
/// restart; a file changed since (or written by another program) has none.
/// Where the filesystem has no user xattrs, proofs are kept in memory.
public final class DiskStorage: Storage, ReversibleDeletion, BlobEnumerating {
    public let root: String
    let objectsDir: String
    let objectsDirBytes: [UInt8]
    let tmpDir: String
    /// Temporaries untouched this long are leftovers of a crashed writer.
    public static let staleTemporaryAge: TimeInterval = 600
    static let proofAttribute = "user.casfs.verified"
    /// Proofs of files whose filesystem refused the xattr.
    private let memoryProofs = Mutex<[Digest: FileIdentity]>([:])

    /// Creates the directories if needed and removes stale temporaries.
    public init(root: String) throws {
        self.root = root
        self.objectsDir = root + "/cas/objects"
        self.objectsDirBytes = Array(objectsDir.utf8)
        self.tmpDir = root + "/tmp"
        for dir in [objectsDir, tmpDir] {
            do {
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            } catch {
                throw StorageError.io(errno: EACCES, "cannot create \(dir): \(error.localizedDescription)")
            }
        }
        removeStaleTemporaries()
    }

    /// Path of the object file for `digest`.
    public func objectPath(_ digest: Digest) -> String {
        let h = digest.hash
        let split = h.index(h.startIndex, offsetBy: 2)
        return "\(objectsDir)/\(h[..<split])/\(h[split...])"
    }

    /// Runs `body` with the object path of `digest` as a C string, built on
    /// the stack (lookups and opens are hot paths).
    func withObjectPath<T>(_ digest: Digest, _ body: (UnsafePointer<CChar>) throws -> T) rethrows -> T {
        let dir = objectsDirBytes
        return try withUnsafeTemporaryAllocation(of: CChar.self, capacity: dir.count + 70) { buf in
            var i = 0
            for b in dir { buf[i] = CChar(bitPattern: b); i += 1 }
            buf[i] = 0x2F; i += 1
            var k = 0
            for c in digest.hash.utf8 {
                buf[i] = CChar(bitPattern: c); i += 1
                k += 1
                if k == 2 { buf[i] = 0x2F; i += 1 }
            }
            buf[i] = 0
            return try body(buf.baseAddress!)
        }
    }

    public func hasBlob(_ digest: Digest) throws -> Bool {
        var st = stat()
        let rc = withObjectPath(digest) { stat($0, &st) }
        if rc != 0 {
            if errno == ENOENT || errno == ENOTDIR { return false }
            throw StorageError.posix("stat \(objectPath(digest))")
        }
        return Int64(st.st_size) == digest.size
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? { try openBlob(digest) }

    /// The object file, open; nil if absent or of another length.
    public func openBlob(_ digest: Digest) throws -> BlobSource? {
        let fd = withObjectPath(digest) { open($0, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else {
            if errno == ENOENT || errno == ENOTDIR { return nil }
            throw StorageError.posix("open \(objectPath(digest))")
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = StorageError.posix("fstat \(objectPath(digest))")
            close(fd)
            throw e
        }
        guard Int64(st.st_size) == digest.size else {
            close(fd)
            return nil
        }
        return FileSource(fd: fd, size: digest.size, verified: hasProof(fd: fd, st, digest))
    }

    public func deleteBlob(_ digest: Digest) throws {
        let path = objectPath(digest)
        // Only remove the file if it is this blob (same hash, right size).
        guard try fileSize(path) == digest.size else { return }
        forgetProof(digest)
        if unlink(path) != 0 && errno != ENOENT {
            throw StorageError.posix("unlink \(path)")
        }
    }

    /// Present with a valid proof: a rewrite can be skipped. A file without
    /// one is replaced by the next write (which repairs a corrupt object).
    public func skipsWrite(_ digest: Digest) throws -> Bool {
        guard let src = try openBlob(digest) else { return false }
        return src.isVerified
    }

    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        let path = objectPath(digest)
        let existing = try fileSize(path)
        if existing == digest.size, try skipsWrite(digest) { return }
        guard source.size == digest.size else {
            throw StorageError.sizeMismatch(expected: digest, actualSize: source.size)
        }

        let (fd, tmpPath) = try makeTemporary(digest.hash)
        var linked = false
        defer {
            close(fd)
            if !linked { unlink(tmpPath) }
        }
        try copy(source, to: fd)
        fchmod(fd, 0o644)
        // The bytes were verified by the caller: the new file carries the proof.
        recordProof(fd: fd, digest)

        if existing != nil {
            // A file of the wrong length, or one without a proof, sits at the
            // path: replace it atomically.
            guard rename(tmpPath, path) == 0 else { throw StorageError.posix("rename into \(path)") }
            linked = true
            return
        }
        if link(tmpPath, path) != 0 {
            if errno == ENOENT {
                let dir = String(path[..<path.lastIndex(of: "/")!])
                if mkdir(dir, 0o755) != 0 && errno != EEXIST { throw StorageError.posix("mkdir \(dir)") }
                if link(tmpPath, path) != 0 && errno != EEXIST { throw StorageError.posix("link \(path)") }
            } else if errno != EEXIST {
                throw StorageError.posix("link \(path)")
            }
        }
    }

    public func recordVerified(_ digest: Digest, _ source: BlobSource) {
        guard let fd = source.fileDescriptor, source.size == digest.size else { return }
        recordProof(fd: fd, digest)
    }

    // MARK: proofs

    struct FileIdentity: Equatable {
        var inode: UInt64
        var size: Int64
        var mtimeSeconds: Int64
        var mtimeNanos: Int64

        init(_ st: stat) {
            inode = UInt64(st.st_ino)
            size = Int64(st.st_size)
            mtimeSeconds = Int64(st.st_mtim.tv_sec)
            mtimeNanos = Int64(st.st_mtim.tv_nsec)
        }

        /// The proof as stored: a tag, the raw SHA-256, then size, inode and
        /// mtime (seconds, nanoseconds), little-endian.
        func proof(_ d: Digest) -> [UInt8] {
            var b = FileIdentity.tag
            b += d.rawHash
            for v in [UInt64(bitPattern: size), inode, UInt64(bitPattern: mtimeSeconds), UInt64(bitPattern: mtimeNanos)] {
                withUnsafeBytes(of: v.littleEndian) { b += $0 }
            }
            return b
        }

        static let tag: [UInt8] = Array("casfs:1\0".utf8)
        static let proofSize = 8 + 32 + 32

        /// True if `p` is the proof of `d` for a file with this identity
        /// (compared in place: opens are a hot path).
        func matches(_ p: UnsafeRawBufferPointer, _ d: Digest) -> Bool {
            guard p.count == Self.proofSize else { return false }
            for i in 0..<8 where p[i] != Self.tag[i] { return false }
            var i = 8
            var hi: UInt8?
            for c in d.hash.utf8 {
                let v = c <= 57 ? c &- 48 : c &- 87
                if let h = hi {
                    if p[i] != h << 4 | v { return false }
                    i += 1
                    hi = nil
                } else {
                    hi = v
                }
            }
            func u64(_ at: Int) -> UInt64 { UInt64(littleEndian: p.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
            return u64(40) == UInt64(bitPattern: size) && u64(48) == inode
                && u64(56) == UInt64(bitPattern: mtimeSeconds) && u64(64) == UInt64(bitPattern: mtimeNanos)
        }
    }

    private func hasProof(fd: Int32, _ st: stat, _ digest: Digest) -> Bool {
        let id = FileIdentity(st)
        let found = withUnsafeTemporaryAllocation(byteCount: 128, alignment: 8) { buf -> Bool? in
            let n = fgetxattr(fd, DiskStorage.proofAttribute, buf.baseAddress, buf.count)
            guard n > 0 else { return nil }
            return id.matches(UnsafeRawBufferPointer(rebasing: buf[0..<n]), digest)
        }
        if let found { return found }
        return memoryProofs.withLock { $0[digest] } == id
    }

    private func recordProof(fd: Int32, _ digest: Digest) {
        var st = stat()
        guard fstat(fd, &st) == 0, Int64(st.st_size) == digest.size else { return }
        let id = FileIdentity(st)
        let proof = id.proof(digest)
        if fsetxattr(fd, DiskStorage.proofAttribute, proof, proof.count, 0) == 0 { return }
        memoryProofs.withLock { proofs in
            if proofs.count >= 1_000_000 { proofs.removeAll() }
            proofs[digest] = id
        }
    }

    private func forgetProof(_ digest: Digest) {
        memoryProofs.withLock { _ = $0.removeValue(forKey: digest) }
    }

    // MARK: reversible deletion

    public func withdraw(_ digest: Digest) throws -> WithdrawnBlob? {
        let path = objectPath(digest)
        guard try fileSize(path) == digest.size else { return nil }
        let aside = "\(tmpDir)/withdrawn-\(digest.hash)-\(UUID().uuidString.prefix(8))"
        guard rename(path, aside) == 0 else {
            if errno == ENOENT { return nil }
            throw StorageError.posix("withdraw \(path)")
        }
        return WithdrawnBlob(digest: digest, token: aside)
    }

    public func restore(_ blob: WithdrawnBlob) -> Bool {
        let path = objectPath(blob.digest)
        // Never over a copy stored meanwhile: that one is as good.
        if link(blob.token, path) == 0 || errno == EEXIST {
            unlink(blob.token)
            return true
        }
        return false
    }

    public func discard(_ blob: WithdrawnBlob) {
        forgetProof(blob.digest)
        unlink(blob.token)
    }

    // MARK: listing and housekeeping

    /// Calls `body` for every object in the store whose name is a well-formed
    /// hash, with its size (for rebuilding an index from the disk).
    public func forEachBlob(_ body: (Digest) throws -> Void) throws {
        let fm = FileManager.default
        guard let prefixes = try? fm.contentsOfDirectory(atPath: objectsDir) else { return }
        for p in prefixes.sorted() where p.utf8.count == 2 {
            guard let names = try? fm.contentsOfDirectory(atPath: "\(objectsDir)/\(p)") else { continue }
            for n in names where n.utf8.count == 62 {
                guard let size = try fileSize("\(objectsDir)/\(p)/\(n)"),
                      let d = try? Digest(hash: p + n, size: size) else { continue }
                try body(d)
            }
        }
    }

    /// Removes temporaries nobody has written to for `staleTemporaryAge`
    /// (a live writer keeps touching its file): leftovers of a killed writer.
    @discardableResult
    public func removeStaleTemporaries(olderThan age: TimeInterval = DiskStorage.staleTemporaryAge) -> Int {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: tmpDir) else { return 0 }
        let cutoff = Date().timeIntervalSince1970 - age
        var removed = 0
        for n in names {
            let p = tmpDir + "/" + n
            var st = stat()
            guard lstat(p, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG,
                  Double(st.st_mtim.tv_sec) < cutoff else { continue }
            if unlink(p) == 0 { removed += 1 }
        }
        if removed > 0 { log.info("removed \(removed) stale temporary files from \(tmpDir)") }
        return removed
    }

    private func makeTemporary(_ name: String) throws -> (Int32, String) {
        var template = Array("\(tmpDir)/\(name).XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw StorageError.posix("create temporary file in \(tmpDir)") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return (fd, String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }

    private func copy(_ source: BlobSource, to fd: Int32) throws {
        if let from = source.fileDescriptor {
            if try copyFile(from: from, to: fd, size: source.size) { return }
            guard lseek(fd, 0, SEEK_SET) == 0, ftruncate(fd, 0) == 0 else { throw StorageError.posix("reset temporary file") }
        }
        try source.forEachChunk { chunk in
            try chunk.withUnsafeBytes { try writeFully(fd, $0) }
        }
    }

    /// The size of the file at `path`, or nil if there is none.
    private func fileSize(_ path: String) throws -> Int64? {
        var st = stat()
        if stat(path, &st) != 0 {
            if errno == ENOENT || errno == ENOTDIR { return nil }
            throw StorageError.posix("stat \(path)")
        }
        return Int64(st.st_size)
    }
}

/// Copies `size` bytes of `from` (from its start) to `to` in the kernel
/// (copy_file_range, else sendfile). False when neither applies here; the
/// caller then copies by reading.
func copyFile(from: Int32, to: Int32, size: Int64) throws -> Bool {
    var offset: off_t = 0
    var left = size
    while left > 0 {
        let n = sendfile(to, from, &offset, Int(min(left, 1 << 30)))
        if n < 0 {
            if errno == EINTR { continue }
            if errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP { return false }
            throw StorageError.posix("copy")
        }
        if n == 0 { throw StorageError.io(errno: EIO, "source shorter than its size") }
        left -= Int64(n)
    }
    return true
}
