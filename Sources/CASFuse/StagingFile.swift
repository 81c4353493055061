import CASCore
import Foundation
import Synchronization

/// A blob being written through the mount: a private, already-unlinked file in
/// the staging directory. At flush/release its length and SHA-256 are checked
/// against the name; only a match is committed to the storage.

final class StagingFile: Sendable {
    let digest: Digest
    let fd: Int32

    private struct State {
        /// Bytes changed since the last verification.
        var dirty = true
        /// Result of the last verification/commit (0 or an errno).
        var result: Int32 = 0
    }

    private let state = Mutex(State())

    private init(digest: Digest, fd: Int32) {
        self.digest = digest
        self.fd = fd
    }

    deinit { close(fd) }

    /// Opens an anonymous file in `directory`.
    static func create(for digest: Digest, in directory: String) throws -> StagingFile {
        StagingFile(digest: digest, fd: try openAnonymousFile(in: directory))
    }

    func write(_ buf: UnsafeRawBufferPointer, at offset: Int64) throws -> Int {
        guard offset >= 0 else { throw StorageError.io(errno: EINVAL, "negative offset") }
        // Bytes past the name's size can never verify: refuse them at once.
        guard offset + Int64(buf.count) <= digest.size else {
            state.withLock { $0.dirty = true }
            throw StorageError.io(errno: EFBIG, "write past the size in the name \(digest)")
        }
        var done = 0
        while done < buf.count {
            let r = pwrite(fd, buf.baseAddress! + done, buf.count - done, off_t(offset) + off_t(done))
            if r < 0 {
                if errno == EINTR { continue }
                throw StorageError.posix("staging write")
            }
            done += r
        }
        state.withLock { $0.dirty = true }
        return done
    }

    func read(offset: Int64, length: Int) throws -> Data {
        try FileSource(fd: dup(fd), size: currentSize()).read(offset: offset, length: length)
    }

    func truncate(to size: Int64) throws {
        guard ftruncate(fd, off_t(size)) == 0 else { throw StorageError.posix("staging truncate") }
        state.withLock { $0.dirty = true }
    }

    func currentSize() -> Int64 {
        var st = stat()
        return fstat(fd, &st) == 0 ? Int64(st.st_size) : 0
    }

    /// Verifies and commits if anything changed since the last time. Returns
    /// 0 or an errno, and whether a verification ran now.
    func finish(storage: any Storage, log: (String) -> Void) -> (result: Int32, ran: Bool) {
        state.withLock { st -> (Int32, Bool) in
            guard st.dirty else { return (st.result, false) }
            st.dirty = false
            st.result = verifyAndCommit(storage: storage, log: log)
            return (st.result, true)
        }
    }

    private func reject(_ why: String, log: (String) -> Void) -> Int32 {
        log("write of \(digest) rejected: \(why)")
        _ = ftruncate(fd, 0)
        return EIO
    }

    private func verifyAndCommit(storage: any Storage, log: (String) -> Void) -> Int32 {
        let size = currentSize()
        do {
            let dup = Foundation.dup(fd)
            guard dup >= 0 else { throw StorageError.posix("dup") }
            // The storage checks the bytes against the name before storing them.
            try storage.commitWrite(digest, FileSource(fd: dup, size: size))
            return 0
        } catch StorageError.digestMismatch(_, let actual) {
            return reject("content is \(actual)", log: log)
        } catch StorageError.sizeMismatch {
            return reject("\(size) bytes written", log: log)
        } catch {
            let e = StorageError.wrap(error)
            log("commit of \(digest) failed: \(e)")
            return e.errno
        }
    }
}
