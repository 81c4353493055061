import CASCore
import Foundation
import Synchronization

/// Blobs as files in BuildGrid's on-disk layout, so casfs can serve an existing
/// BuildGrid disk store: `<root>/cas/objects/<hash[0:2]>/<hash[2:]>`, temporaries
/// in `<root>/tmp`. A commit writes a temporary file and links it into place, so
/// a crash never leaves a partial object visible. A file whose length differs
/// from the digest's size is not that blob.
public final class DiskStorage: Storage {
    public let root: String
    let objectsDir: String
    let tmpDir: String
    private let openFiles: FileSourceCache

    /// Creates the directories if needed.
    public init(root: String, openFileCacheSize: Int = 256) throws {
        self.root = root
        self.objectsDir = root + "/cas/objects"
        self.tmpDir = root + "/tmp"
        self.openFiles = FileSourceCache(capacity: openFileCacheSize)
        for dir in [objectsDir, tmpDir] {
            do {
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            } catch {
                throw StorageError.io(errno: EACCES, "cannot create \(dir): \(error.localizedDescription)")
            }
        }
    }

    /// Path of the object file for `digest`.
    public func objectPath(_ digest: Digest) -> String {
        let h = digest.hash
        let split = h.index(h.startIndex, offsetBy: 2)
        return "\(objectsDir)/\(h[..<split])/\(h[split...])"
    }

    public func hasBlob(_ digest: Digest) throws -> Bool {
        if digest.isEmpty { return true }
        return try fileSize(objectPath(digest)) == digest.size
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? {
        if digest.isEmpty { return DataSource(Data()) }
        if let cached = openFiles.get(digest) { return cached }
        let src: FileSource
        do {
            src = try FileSource(path: objectPath(digest))
        } catch StorageError.io(let e, _) where e == ENOENT || e == ENOTDIR {
            return nil
        }
        guard src.size == digest.size else { return nil }
        openFiles.put(digest, src)
        return src
    }

    public func deleteBlob(_ digest: Digest) throws {
        if digest.isEmpty { return }
        openFiles.remove(digest)
        let path = objectPath(digest)
        // Only remove the file if it is this blob (same hash, right size).
        guard try fileSize(path) == digest.size else { return }
        if unlink(path) != 0 && errno != ENOENT {
            throw StorageError.posix("unlink \(path)")
        }
    }

    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        if digest.isEmpty { return }
        let path = objectPath(digest)
        let existing = try fileSize(path)
        if existing == digest.size { return }
        guard source.size == digest.size else {
            throw StorageError.sizeMismatch(expected: digest, actualSize: source.size)
        }

        var template = Array("\(tmpDir)/\(digest.hash).XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw StorageError.posix("create temporary file in \(tmpDir)") }
        let tmpPath = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var linked = false
        defer {
            close(fd)
            if !linked { unlink(tmpPath) }
        }
        try copy(source, to: fd)
        fchmod(fd, 0o644)

        if existing != nil {
            // A file of the wrong length sits at the path: replace it atomically.
            guard rename(tmpPath, path) == 0 else { throw StorageError.posix("rename into \(path)") }
            linked = true
            openFiles.remove(digest)
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

    private func copy(_ source: BlobSource, to fd: Int32) throws {
        if let file = source as? FileSource {
            var offset: off_t = 0
            var left = Int(file.size)
            while left > 0 {
                let n = sendfile(fd, file.fd, &offset, left)
                if n < 0 {
                    if errno == EINTR { continue }
                    if errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP { break }
                    throw StorageError.posix("copy into temporary file")
                }
                if n == 0 { throw StorageError.io(errno: EIO, "source shorter than its size") }
                left -= n
            }
            if left == 0 { return }
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

/// A small cache of open object files, so ranged reads do not reopen the file each time.
final class FileSourceCache: Sendable {
    private let capacity: Int
    private let state = Mutex<(files: [Digest: FileSource], order: [Digest])>(([:], []))

    init(capacity: Int) { self.capacity = capacity }

    func get(_ d: Digest) -> FileSource? { state.withLock { $0.files[d] } }

    func put(_ d: Digest, _ f: FileSource) {
        guard capacity > 0 else { return }
        state.withLock { s in
            if s.files[d] != nil { return }
            if s.order.count >= capacity {
                let old = s.order.removeFirst()
                s.files[old] = nil
            }
            s.files[d] = f
            s.order.append(d)
        }
    }

    func remove(_ d: Digest) {
        state.withLock { s in
            if s.files.removeValue(forKey: d) != nil { s.order.removeAll { $0 == d } }
        }
    }
}
