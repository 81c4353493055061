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
/// A file casfs wrote or verified has a proof (see `DiskProofs`: its inode,
/// size and change time, kept beside the store), so it is not hashed again;
/// a file changed since in any way (or written by another program) has none.
///
/// A write of a blob that is present compares the stored copy with the
/// verified bytes: equal, nothing is written; different (a damaged copy),
/// the copy is replaced atomically.
public final class DiskStorage: Storage, ReversibleDeletion, BlobEnumerating, CopyTracking {
    public let root: String
    let objectsDir: String
    let objectsDirBytes: [UInt8]
    let tmpDir: String
    /// Temporaries untouched this long are leftovers of a crashed writer.
    public static let staleTemporaryAge: TimeInterval = 600
    let proofs: DiskProofs
    private let replacedCopies: MetricCounter

    /// Creates the directories if needed and removes stale temporaries.
    /// Proofs of files of `proofRecordThreshold` bytes or more outlive the process.
    public init(root: String, proofRecordThreshold: Int64 = 1 << 20, metrics: MetricScope = .standalone("disk")) throws {
        self.root = root
        self.objectsDir = root + "/cas/objects"
        self.objectsDirBytes = Array(objectsDir.utf8)
        self.tmpDir = root + "/tmp"
        self.proofs = DiskProofs(root: root, recordThreshold: proofRecordThreshold)
        replacedCopies = metrics.counter(MetricCatalog.damagedCopiesReplaced)
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
        let rc = withObjectPath(digest) { lstat($0, &st) }
        if rc != 0 {
            if errno == ENOENT || errno == ENOTDIR { return false }
            throw StorageError.posix("stat \(objectPath(digest))")
        }
        return Int64(st.st_size) == digest.size && (st.st_mode & S_IFMT) == S_IFREG
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? { try openBlob(digest) }

    /// The object file, open; nil if absent, of another length, or not a
    /// regular file (a symlink or a FIFO planted there is never followed
    /// nor opened for reading).
    public func openBlob(_ digest: Digest) throws -> BlobSource? {
        guard let f = try openObject(digest), f.size == digest.size else { return nil }
        return f.proven(proofs.isProven(digest, f.stamp))
    }

    /// The regular file at `digest`'s object path, whatever its length; nil if none.
    func openObject(_ digest: Digest) throws -> StoreFile? {
        let fd = withObjectPath(digest) { open($0, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK) }
        guard fd >= 0 else {
            if errno == ENOENT || errno == ENOTDIR || errno == ELOOP { return nil }
            throw StorageError.posix("open \(objectPath(digest))")
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = StorageError.posix("fstat \(objectPath(digest))")
            close(fd)
            throw e
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            return nil
        }
        return StoreFile(fd: fd, stamp: FileStamp(st), verified: false, store: self)
    }

    public func deleteBlob(_ digest: Digest) throws {
        let path = objectPath(digest)
        // Only remove the file if it is this blob (same hash, right size).
        guard try fileSize(path) == digest.size else { return }
        proofs.forget(digest)
        if unlink(path) != 0 && errno != ENOENT {
            throw StorageError.posix("unlink \(path)")
        }
    }

    /// Present with these very bytes: the stored copy is compared with
    /// `source` (verified bytes), so a damaged copy is never kept by a
    /// rewrite. An intact copy without a proof gets one.
    public func skipsWrite(_ digest: Digest, _ source: BlobSource) throws -> Bool {
        guard let f = try openObject(digest), f.size == digest.size else { return false }
        return intact(f, digest, source)
    }

    /// True if the file holds exactly `source`'s bytes (then proven, if the
    /// file did not change meanwhile). A file that cannot be read is not intact.
    private func intact(_ f: StoreFile, _ d: Digest, _ source: BlobSource) -> Bool {
        guard source.size == d.size, (try? sameBytes(f, source)) == true else { return false }
        if !proofs.isProven(d, f.stamp), FileStamp.of(fd: f.fd) == f.stamp { proofs.record(d, f.stamp) }
        return true
    }

    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        _ = try commitTracked(digest, source)
    }

    /// Stores `source` (verified bytes) under `digest`: an intact copy is
    /// kept (nil is returned), anything else at the path (damaged, of
    /// another length) is replaced atomically; returns the copy put in place.
    public func commitTracked(_ digest: Digest, _ source: BlobSource) throws -> FileStamp? {
        guard source.size == digest.size else {
            throw StorageError.sizeMismatch(expected: digest, actualSize: source.size)
        }
        let path = objectPath(digest)
        var damaged: FileStamp?
        if let existing = try openObject(digest) {
            if existing.size == digest.size && intact(existing, digest, source) { return nil }
            damaged = existing.stamp
        }

        let (fd, tmpPath) = try makeTemporary(digest.hash)
        var placed = false
        defer {
            close(fd)
            if !placed { unlink(tmpPath) }
        }
        try copy(source, to: fd)
        fchmod(fd, 0o644)

        if let damaged {
            // The verified bytes replace the damaged copy in one step: readers
            // that have it open keep it, new ones get the good bytes.
            proofs.forget(digest)
            guard rename(tmpPath, path) == 0 else { throw StorageError.posix("rename into \(path)") }
            placed = true
            replacedCopies.add()
            log.warning("replaced a damaged copy of \(digest) in \(root) (\(damaged)) with verified bytes")
        } else {
            if link(tmpPath, path) != 0 {
                var e = errno
                if e == ENOENT {
                    let dir = String(path[..<path.lastIndex(of: "/")!])
                    if mkdir(dir, 0o755) != 0 && errno != EEXIST { throw StorageError.posix("mkdir \(dir)") }
                    e = link(tmpPath, path) == 0 ? 0 : errno
                }
                if e == EEXIST {
                    // Another writer's copy landed first, if it is a regular
                    // file of the blob's length; anything else there (a
                    // symlink, a directory, a FIFO, a file of another length)
                    // holds no bytes of this blob and is replaced.
                    var st = stat()
                    let found = lstat(path, &st) == 0
                    if found && (st.st_mode & S_IFMT) == S_IFREG && Int64(st.st_size) == digest.size { return nil }
                    try replaceForeign(path, found ? st.st_mode & S_IFMT : 0, with: tmpPath, digest)
                    placed = true
                } else if e != 0 {
                    throw StorageError.posix("link \(path)", e)
                }
            }
            if !placed { unlink(tmpPath) }
            placed = true
        }
        // The stamp after the last change of links (each moves ctime): the proof names it.
        guard let stamp = FileStamp.of(fd: fd) else { return nil }
        proofs.record(digest, stamp)
        return stamp
    }

    /// Puts the temporary `tmpPath` at the object path `path`, where
    /// something that is not a copy of `digest` is (`type`: its file type,
    /// 0 if it vanished): renamed over it in one step; a directory is first
    /// moved aside into the temporary area (removed there if empty).
    private func replaceForeign(_ path: String, _ type: mode_t, with tmpPath: String, _ digest: Digest) throws {
        proofs.forget(digest)
        if type == S_IFDIR {
            let aside = "\(tmpDir)/displaced-\(digest.hash)-\(UUID().uuidString.prefix(8))"
            guard rename(path, aside) == 0 || errno == ENOENT else { throw StorageError.posix("move aside the directory at \(path)") }
            if rmdir(aside) != 0 && errno != ENOENT {
                log.warning("a directory stood at the object path of \(digest); moved to \(aside)")
            }
        }
        guard rename(tmpPath, path) == 0 else { throw StorageError.posix("rename into \(path)") }
        replacedCopies.add()
        let what = type == S_IFLNK ? "a symbolic link" : type == S_IFDIR ? "a directory" : type == S_IFIFO ? "a FIFO"
            : type == S_IFREG ? "a file of another length" : type == 0 ? "nothing" : "a special file"
        log.warning("\(what) stood at the object path of \(digest) in \(root); replaced with verified bytes")
    }

    /// Records the proof of a file of this store that was just verified,
    /// if it did not change since it was opened.
    public func recordVerified(_ digest: Digest, _ source: BlobSource) {
        guard let f = source as? StoreFile, f.store === self, f.size == digest.size,
              FileStamp.of(fd: f.fd) == f.stamp else { return }
        proofs.record(digest, f.stamp)
    }

    /// True if a proof names the file with this stamp as `digest`'s bytes.
    public func isProven(_ digest: Digest, _ stamp: FileStamp) -> Bool { proofs.isProven(digest, stamp) }

    /// Records that the file with `stamp` holds `digest`'s bytes (the caller hashed it).
    public func recordProof(_ digest: Digest, _ stamp: FileStamp) { proofs.record(digest, stamp) }

    // MARK: reversible deletion

    public func withdraw(_ digest: Digest) throws -> WithdrawnBlob? {
        let path = objectPath(digest)
        guard try fileSize(path) == digest.size else { return nil }
        let aside = asidePath(digest)
        guard rename(path, aside) == 0 else {
            if errno == ENOENT { return nil }
            throw StorageError.posix("withdraw \(path)")
        }
        proofs.forget(digest)
        return WithdrawnBlob(digest: digest, token: aside)
    }

    /// Withdraws the file at `digest`'s path only if it is still the copy
    /// `copy` names (same inode and change time): a copy another writer put
    /// there meanwhile is never taken. Nil if it is not there any more.
    public func withdraw(_ digest: Digest, ifStill expected: FileStamp) throws -> WithdrawnBlob? {
        let path = objectPath(digest)
        guard let now = FileStamp.of(path: path), now.proves(expected) else { return nil }
        let aside = asidePath(digest)
        guard rename(path, aside) == 0 else {
            if errno == ENOENT { return nil }
            throw StorageError.posix("withdraw \(path)")
        }
        // Replaced between the check and the rename: put that copy back.
        guard FileStamp.of(path: aside)?.inode == expected.inode else {
            if link(aside, path) != 0 && errno != EEXIST { log.error("could not put back \(path): \(String(cString: strerror(errno)))") }
            unlink(aside)
            return nil
        }
        proofs.forget(digest)
        return WithdrawnBlob(digest: digest, token: aside)
    }

    /// Replaces the copy `copy` of `digest` with `source` (verified bytes),
    /// atomically, if it is still the one in place. False if it was not.
    public func replace(_ digest: Digest, _ source: BlobSource, ifStill expected: FileStamp) throws -> Bool {
        guard source.size == digest.size else { throw StorageError.sizeMismatch(expected: digest, actualSize: source.size) }
        let path = objectPath(digest)
        let (fd, tmpPath) = try makeTemporary(digest.hash)
        var placed = false
        defer {
            close(fd)
            if !placed { unlink(tmpPath) }
        }
        try copy(source, to: fd)
        fchmod(fd, 0o644)
        // A copy put there meanwhile by a writer is as good as ours: keep it.
        guard let now = FileStamp.of(path: path), now.proves(expected) else { return false }
        proofs.forget(digest)
        guard rename(tmpPath, path) == 0 else { throw StorageError.posix("rename into \(path)") }
        placed = true
        if let stamp = FileStamp.of(fd: fd) { proofs.record(digest, stamp) }
        return true
    }

    private func asidePath(_ digest: Digest) -> String {
        "\(tmpDir)/withdrawn-\(digest.hash)-\(UUID().uuidString.prefix(8))"
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
        unlink(blob.token)
    }

    // MARK: listing and housekeeping

    /// Calls `body` for every object in the store whose name is a well-formed
    /// hash, with its size (for rebuilding an index from the disk).
    public func forEachBlob(_ body: (Digest) throws -> Void) throws {
        for p in objectPrefixes() {
            for n in objectNames(prefix: p) {
                guard let size = try fileSize("\(objectsDir)/\(p)/\(n)"),
                      let d = try? Digest(hash: p + n, size: size) else { continue }
                try body(d)
            }
        }
    }

    /// The object directories (`00` … `ff`) present, in order.
    public func objectPrefixes() -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: objectsDir)) ?? []
        return names.filter { $0.utf8.count == 2 && $0.utf8.allSatisfy(Digest.isLowerHexByte) }.sorted()
    }

    /// The object names (the hash without its first two digits) under
    /// `prefix` that are well formed, in order.
    public func objectNames(prefix: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "\(objectsDir)/\(prefix)")) ?? []
        return names.filter { $0.utf8.count == 62 && $0.utf8.allSatisfy(Digest.isLowerHexByte) }.sorted()
    }

    /// Removes proof records whose object is gone from the object directory `prefix`.
    @discardableResult
    public func removeStaleProofs(prefix: String, objects: [String]) -> Int {
        proofs.removeStaleRecords(prefix: prefix, objects: Set(objects))
    }

    /// Removes temporaries nobody has written to for `staleTemporaryAge`
    /// (a live writer keeps touching its file): leftovers of a killed writer.
    /// A withdrawn copy (`withdrawn-*`, renamed here by a deletion that may
    /// still be undone) keeps its object's old mtime: its age is judged by
    /// its change time, which the rename moved.
    @discardableResult
    public func removeStaleTemporaries(olderThan age: TimeInterval = DiskStorage.staleTemporaryAge) -> Int {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: tmpDir) else { return 0 }
        let cutoff = Date().timeIntervalSince1970 - age
        var removed = 0
        for n in names {
            let p = tmpDir + "/" + n
            var st = stat()
            guard lstat(p, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG,
                  Double(n.hasPrefix("withdrawn-") ? st.st_ctim.tv_sec : st.st_mtim.tv_sec) < cutoff else { continue }
            if unlink(p) == 0 { removed += 1 }
        }
        if removed > 0 { log.info("removed \(removed) stale temporary files from \(tmpDir)") }
        return removed
    }

    private func makeTemporary(_ name: String) throws -> (Int32, String) {
        var template = Array("\(tmpDir)/\(name).XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { casfs_mkstemp_cloexec($0.baseAddress!) }
        guard fd >= 0 else { throw StorageError.posix("create temporary file in \(tmpDir)") }
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

/// A store that can tell which copy a write put in place, and take back
/// exactly that copy: an index whose write failed removes the bytes it
/// stored, never a copy another writer stored meanwhile.
public protocol CopyTracking: ReversibleDeletion {
    /// Stores like `commitWrite`; returns the copy this call put in place,
    /// or nil if an intact copy was there already (or another writer's
    /// landed first).
    func commitTracked(_ digest: Digest, _ source: BlobSource) throws -> FileStamp?
    /// Withdraws `digest`'s copy only if it is still `copy`; nil otherwise.
    func withdraw(_ digest: Digest, ifStill copy: FileStamp) throws -> WithdrawnBlob?
}

/// An object file of a `DiskStorage`, open, with what it was when opened.
final class StoreFile: BlobSource, @unchecked Sendable {
    let fd: Int32
    let stamp: FileStamp
    let isVerified: Bool
    /// The store that opened it: only that store records its proof.
    let store: DiskStorage
    private let owner: StoreFile?

    init(fd: Int32, stamp: FileStamp, verified: Bool, store: DiskStorage, owner: StoreFile? = nil) {
        self.fd = fd
        self.stamp = stamp
        self.isVerified = verified
        self.store = store
        self.owner = owner
    }

    /// The same open file, marked proven or not (sharing the descriptor).
    func proven(_ verified: Bool) -> StoreFile {
        StoreFile(fd: fd, stamp: stamp, verified: verified, store: store, owner: self)
    }

    deinit { if owner == nil { close(fd) } }

    var size: Int64 { stamp.size }
    var fileDescriptor: Int32? { fd }

    func read(offset: Int64, length: Int) throws -> Data {
        try preadData(fd, size: size, offset: offset, length: length)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        guard offset >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        let n = Int(max(0, min(Int64(buffer.count), size - offset)))
        if n == 0 { return 0 }
        return try preadFully(fd, buffer.baseAddress!, n, offset)
    }
}

/// True if the file `f` holds exactly `source`'s bytes (read in 1 MiB steps).
func sameBytes(_ f: StoreFile, _ source: BlobSource) throws -> Bool {
    guard f.size == source.size else { return false }
    let chunk = Int(min(Int64(streamChunkSize), max(1, f.size)))
    var a = [UInt8](repeating: 0, count: chunk)
    var b = [UInt8](repeating: 0, count: chunk)
    var offset: Int64 = 0
    while offset < f.size {
        let want = Int(min(Int64(chunk), f.size - offset))
        let n = try a.withUnsafeMutableBytes { try preadFully(f.fd, $0.baseAddress!, want, offset) }
        let m = try b.withUnsafeMutableBytes { try source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<want]), offset: offset) }
        guard n == want, m == want else { return false }
        if memcmp(a, b, want) != 0 { return false }
        offset += Int64(want)
    }
    return true
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
