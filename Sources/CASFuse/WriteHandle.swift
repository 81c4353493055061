import CASCore
import Foundation
import Synchronization
import FuseKernel

/// A blob being written through the mount: a private, already-unlinked file
/// in the staging directory, hashed as sequential writes arrive. The bytes
/// are judged when the last descriptor of the open file closes, as a shell
/// writing through several dup'd descriptors expects:
/// - a FLUSH (a close) that finds the content complete commits it through
///   the storage stack, which checks it against the name: a mismatch is EIO
///   at that close, and nothing is stored;
/// - a FLUSH that finds it incomplete while another process still holds the
///   open file (`{ cat a; cat b; } > name`, `cmd > name` in a shell) leaves
///   it as it is and succeeds; the last holder's close is EIO;
/// - RELEASE (the last close, whose result nobody sees) makes the final
///   judgment: a write that never became right is logged and counted once.
/// Writing into an existing blob needs it truncated by the open itself
/// (O_TRUNC: `>`, `cp`): in place, or after `ftruncate`, it is EPERM; past
/// the size in the name it is EFBIG.
final class WriteHandle: @unchecked Sendable {
    let digest: Digest
    let ino: UInt64
    let fd: Int32
    /// The blob was there when the file was opened: readers keep seeing its
    /// size while it is rewritten.
    let existed: Bool
    /// The thread that opened it: the O_TRUNC of its open arrives as a
    /// SETATTR from that thread, without a file handle.
    let openerThread: UInt32
    var mode: PassthroughFiles.Mode = .none

    /// Held while bytes are written or judged (a commit stores them through
    /// the storage stack under it, so nothing changes them meanwhile). What
    /// `stat` needs (size, committed) is published in atomics: a getattr
    /// never waits for a commit.
    private let lock = NSLock()
    private let publishedSize = Atomic<Int64>(0)
    private let publishedCommitted = Atomic<Bool>(false)
    // Guarded by `lock`.
    private var size: Int64 = 0 {
        didSet { publishedSize.store(size, ordering: .releasing) }
    }
    private var hasher: DigestHasher? = DigestHasher()
    private var hashedEnd: Int64 = 0
    private var mayWrite: Bool
    private var committed = false {
        didSet { publishedCommitted.store(committed, ordering: .releasing) }
    }
    /// A commit was tried since the last change (and failed): not tried again.
    private var triedSinceChange = false
    private var failure: String?
    /// Thread-group ids of processes known to hold the open file.
    private var holders: Set<Int32> = []
    /// The thread of the last write (its process is already in `holders`).
    private var lastWriter: UInt32 = 0

    private init(digest: Digest, ino: UInt64, fd: Int32, existed: Bool, truncated: Bool, opener: UInt32) {
        self.digest = digest
        self.ino = ino
        self.fd = fd
        self.existed = existed
        self.openerThread = opener
        self.mayWrite = truncated || !existed
    }

    deinit { close(fd) }

    /// `truncated`: created (O_CREAT on a new name), so writes may start at once.
    static func open(_ digest: Digest, ino: UInt64, in directory: String, existed: Bool, truncated: Bool, opener: UInt32) throws -> WriteHandle {
        let w = WriteHandle(digest: digest, ino: ino, fd: try openAnonymousFile(in: directory), existed: existed,
                            truncated: truncated, opener: opener)
        if let t = ProcessHolders.threadGroup(of: opener) { w.holders.insert(t) }
        return w
    }

    var isCommitted: Bool { publishedCommitted.load(ordering: .acquiring) }

    /// The size `stat` shows: the blob's for a rewrite of an existing one,
    /// else what has been written.
    var visibleSize: Int64 { existed ? digest.size : publishedSize.load(ordering: .acquiring) }

    func write(offset: UInt64, _ data: UnsafeRawBufferPointer, pid: UInt32) -> Result<Int, FuseErrno> {
        lock.withLock {
            guard mayWrite else { return .failure(FuseErrno(EPERM)) }  // in place: blobs are immutable
            let off = Int64(bitPattern: offset)
            guard off >= 0 else { return .failure(FuseErrno(EINVAL)) }
            // Bytes past the size in the name can never verify.
            guard off <= digest.size, Int64(data.count) <= digest.size - off else { return .failure(FuseErrno(EFBIG)) }
            var done = 0
            while done < data.count {
                let r = pwrite(fd, data.baseAddress! + done, data.count - done, off_t(off) + off_t(done))
                if r < 0 {
                    if errno == EINTR { continue }
                    let e = errno
                    return .failure(FuseErrno(e == ENOSPC || e == EDQUOT ? ENOSPC : e))
                }
                done += r
            }
            let end = off + Int64(done)
            size = max(size, end)
            if hasher != nil {
                if off == hashedEnd {
                    hasher!.update(UnsafeRawBufferPointer(rebasing: data[0..<done]))
                    hashedEnd = end
                } else {
                    hasher = nil  // out of order: hashed in full at the commit
                }
            }
            changed()
            if pid != lastWriter {
                lastWriter = pid
                if let t = ProcessHolders.threadGroup(of: pid) { holders.insert(t) }
            }
            return .success(done)
        }
    }

    /// The O_TRUNC of this handle's own open (a SETATTR to size 0, without a
    /// handle, from the opening thread, before anything else): true if it
    /// is that, and the handle may now be written.
    /// A blob gone since the kernel looked it up (cleanup, a repair, another
    /// mount) is written as a new one: its truncate changes nothing.
    func acceptOpenTruncate(size n: UInt64, thread: UInt32) -> Bool {
        // Another open's truncate never waits for this handle (which may be
        // committing, under its lock).
        guard n == 0, thread == openerThread else { return false }
        return lock.withLock {
            guard n == 0, thread == openerThread, size == 0 else { return false }
            if !existed { return true }
            guard !mayWrite else { return false }
            mayWrite = true
            hasher = DigestHasher()
            hashedEnd = 0
            changed()
            return true
        }
    }

    /// ftruncate with this handle. A blob that existed is immutable.
    func truncate(to n: UInt64) -> FuseErrno? {
        lock.withLock {
            guard !existed else { return FuseErrno(EPERM) }
            guard n <= UInt64(digest.size) else { return FuseErrno(EFBIG) }
            guard ftruncate(fd, off_t(n)) == 0 else { return FuseErrno(errno) }
            size = Int64(n)
            if n == 0 {
                hasher = DigestHasher()
                hashedEnd = 0
            } else if size < hashedEnd {
                hasher = nil
            }
            mayWrite = true
            changed()
            return nil
        }
    }

    private func changed() {
        committed = false
        triedSinceChange = false
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        // Not under the lock: a read never waits for a commit.
        let n = publishedSize.load(ordering: .acquiring)
        return try FileSource(fd: fcntl(fd, F_DUPFD_CLOEXEC, 0), size: n).read(into: buffer, offset: Int64(bitPattern: offset))
    }

    /// Stores the bytes if they are complete (lock held). nil: incomplete.
    private func commitIfComplete(_ storage: any Storage) -> Int32? {
        if committed { return 0 }
        guard size == digest.size else { return nil }
        if triedSinceChange { return EIO }
        triedSinceChange = true
        let computed = hasher != nil && hashedEnd == size ? hasher!.finalize() : nil
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { return EIO }
        do {
            try storage.commitWrite(digest, FileSource(fd: copy, size: size, computedDigest: computed))
            committed = true
            failure = nil
            return 0
        } catch StorageError.digestMismatch(_, let actual) {
            failure = "content is \(actual)"
            return EIO
        } catch {
            let e = StorageError.wrap(error)
            failure = "\(e)"
            return e.errno
        }
    }

    /// A close of one descriptor. `pid` is the closing thread.
    func flush(_ storage: any Storage, closer pid: UInt32, holders check: ProcessHolders) -> Int32 {
        let first = lock.withLock { () -> Result<Set<Int32>, FuseErrno> in
            // An existing blob, untouched: nothing to judge.
            if existed && !mayWrite { return .failure(FuseErrno(0)) }
            if let rc = commitIfComplete(storage) { return .failure(FuseErrno(rc)) }
            return .success(holders)
        }
        var candidates: Set<Int32>
        switch first {
        case .failure(let rc): return rc.code
        case .success(let c): candidates = c
        }
        // Incomplete: fine while another descriptor may still add the rest
        // (read from /proc, without the lock: writes go on meanwhile).
        if let t = ProcessHolders.threadGroup(of: pid) { candidates.insert(t) }
        if check.anyHolds(candidates, ino: ino) { return 0 }
        return lock.withLock {
            if let rc = commitIfComplete(storage) { return rc }
            failure = "\(size) of \(digest.size) bytes written"
            return EIO
        }
    }

    /// fsync: durable only once the bytes are complete and stored.
    func fsync(_ storage: any Storage) -> Int32 {
        lock.withLock {
            if existed && !mayWrite { return 0 }
            if let rc = commitIfComplete(storage) { return rc }
            failure = "\(size) of \(digest.size) bytes written"
            return EIO
        }
    }

    /// The last close: commits if complete; otherwise the write is rejected
    /// for good, logged once and counted (by the storage's write check). An
    /// existing blob opened for writing but never truncated nor written
    /// (`touch`, a refused `ftruncate`) is left alone silently.
    func release(_ storage: any Storage) {
        lock.withLock {
            if existed && !mayWrite { return }
            if commitIfComplete(storage) == 0 { return }
            if size != digest.size, let copy = Optional(fcntl(fd, F_DUPFD_CLOEXEC, 0)), copy >= 0 {
                // Let the storage's check see (and count) the wrong length.
                _ = try? storage.commitWrite(digest, FileSource(fd: copy, size: size))
            }
            folded.error(kind: "write rejected", key: digest.description,
                         "write of \(digest) rejected: \(failure ?? "\(size) of \(digest.size) bytes written"); nothing stored")
        }
    }
}

/// Which processes still hold an open file of an inode for writing: read
/// from `/proc/<pid>/fdinfo` (only on a close that finds a write incomplete).
struct ProcessHolders: Sendable {
    /// The thread group (process) of a thread id, nil if it is gone.
    static func threadGroup(of tid: UInt32) -> Int32? {
        guard tid > 0, let text = try? String(contentsOfFile: "/proc/\(tid)/status", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("Tgid:") {
            return Int32(line.dropFirst(5).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    func anyHolds(_ pids: Set<Int32>, ino: UInt64) -> Bool {
        pids.contains { holds($0, ino: ino) }
    }

    /// True if process `pid` has a descriptor open for writing on inode `ino`.
    func holds(_ pid: Int32, ino: UInt64) -> Bool {
        let dir = "/proc/\(pid)/fdinfo"
        guard let fds = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return false }
        let inoLine = "ino:\t\(ino)"
        for fd in fds {
            guard let info = try? String(contentsOfFile: dir + "/" + fd, encoding: .utf8) else { continue }
            let lines = info.split(separator: "\n")
            guard lines.contains(where: { $0 == inoLine }) else { continue }
            for line in lines where line.hasPrefix("flags:") {
                if let flags = Int(line.dropFirst(6).trimmingCharacters(in: .whitespaces), radix: 8), flags & 3 != 0 {
                    return true
                }
            }
        }
        return false
    }
}
