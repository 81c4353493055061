import CASCore
import CLinux
import Foundation
import Synchronization

/// Fallback writes a with-cache storage has deferred, kept on disk until the
/// fallback has them: one file per blob (`<directory>/<hash>_<size>`) holding
/// its bytes, written and synced before the write is acknowledged. Threads
/// send them to the fallback in the background; a failed send is retried with
/// back-off (0.5 s doubling to `maxBackoff`). After a crash or an unmount with
/// sends outstanding, `start` queues what the directory holds.
///
/// The directory is untrusted input, like any file casfs did not just write:
/// - it must belong to this process's user and be writable by nobody else,
///   or the journal is not opened (and the mount does not start);
/// - an entry is opened without following links and must be a regular file
///   of this user with one link and the digest's length;
/// - its bytes are hashed before they are served or sent (once per change
///   of the file: the hash is remembered with the file's change time), and
///   every read re-checks that the file did not change meanwhile;
/// - a bad entry is logged, counted and moved aside to `<directory>/damaged/`;
///   where the cache holds a proven copy of the blob, that copy takes its
///   place, else the deferred write is dropped (its bytes are gone);
/// - a send the fallback refuses for good (the bytes do not match the
///   digest, an invalid request) is not retried forever: after
///   `maxRefusals` refusals the entry is moved to `<directory>/refused/`.
public final class DeferredWriteJournal: Sendable {
    public let directory: String
    public let threads: Int
    public let maxBackoff: Double
    /// Refusals for good after which an entry is no longer sent.
    public static let maxRefusals = 3

    private struct Entry {
        var added: Date
        var attempts = 0
        var refusals = 0
        var notBefore: Date = .distantPast
        var running = false
    }

    private struct State {
        var entries: [Digest: Entry] = [:]
        /// Digests whose entry an `add` is writing: a second adder waits for it.
        var adding: Set<Digest> = []
        /// Digests whose bad entry is being moved aside (and replaced).
        var quarantining: Set<Digest> = []
        var fallback: (any Storage)?
        var onSend: (@Sendable (Error?) -> Void)?
        var repairSource: (@Sendable (Digest) -> BlobSource?)?
        var started = false
        var stopping = false
    }

    private let state = Mutex(State())
    /// Entries hashed and found right, with the stamp they had then.
    private let checked = Mutex<[Digest: FileStamp]>([:])
    private let cond = NSCondition()
    private let sent: MetricCounter
    private let failures: MetricCounter
    private let damaged: MetricCounter
    private let refused: MetricCounter

    /// Opens (creates, mode 0700) the journal directory. Throws
    /// `JournalDirectoryError` when it is not a directory of this user that
    /// only this user can write to.
    public init(directory: String, threads: Int = 8, maxBackoff: Double = 60,
                metrics: MetricScope = .standalone("journal")) throws {
        self.directory = directory
        self.threads = max(1, threads)
        self.maxBackoff = maxBackoff
        sent = metrics.counter(MetricCatalog.deferredSent)
        failures = metrics.counter(MetricCatalog.deferredFailures)
        damaged = metrics.counter(MetricCatalog.journalDamaged)
        refused = metrics.counter(MetricCatalog.deferredRefused)
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw StorageError.io(errno: EACCES, "cannot create the journal directory \(directory): \(error.localizedDescription)")
        }
        try DeferredWriteJournal.checkDirectory(directory)
        let queued = metrics.gauge(MetricCatalog.deferredQueued)
        let oldest = metrics.gauge(MetricCatalog.deferredOldestAge)
        metrics.metrics.onCollect { [weak self] in
            guard let self else { return }
            queued.set(Int64(pending))
            oldest.set(oldestAge)
        }
    }

    /// Refuses a journal directory that another user owns or may write to:
    /// whoever can change its entries could have casfs serve and send any bytes.
    static func checkDirectory(_ directory: String) throws {
        var st = stat()
        guard stat(directory, &st) == 0 else {
            throw JournalDirectoryError(message: "cannot use the journal directory \(directory): \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else {
            throw JournalDirectoryError(message: "the journal \(directory) is not a directory")
        }
        guard st.st_uid == geteuid() else {
            throw JournalDirectoryError(message: "the journal directory \(directory) is owned by uid \(st.st_uid), not by this daemon's user (uid \(geteuid())): chown it, or choose another `journal:`")
        }
        guard st.st_mode & 0o022 == 0 else {
            throw JournalDirectoryError(message: "the journal directory \(directory) is writable by group or others (mode \(String(st.st_mode & 0o7777, radix: 8))): chmod go-w it")
        }
    }

    /// Blobs journaled and not yet sent.
    public var pending: Int { state.withLock { $0.entries.count } }

    /// Seconds since the oldest unsent blob was journaled (0 when none).
    public var oldestAge: Double {
        guard let first = state.withLock({ $0.entries.values.map(\.added).min() }) else { return 0 }
        return max(0, Date().timeIntervalSince(first))
    }

    public func contains(_ d: Digest) -> Bool { state.withLock { $0.entries[d] != nil } }

    /// The journaled bytes of `d`, checked, if it waits to be sent. A bad
    /// entry is handled (see the type) and nil returned.
    public func source(_ d: Digest) -> BlobSource? {
        guard contains(d) else { return nil }
        switch check(d) {
        case .good(let src): return src
        case .bad(let why):
            return quarantine(d, why) ? check(d).source : nil
        case .absent: return nil
        }
    }

    func path(_ d: Digest) -> String { directory + "/" + d.description }

    /// Journals `d` durably (bytes and name synced) and queues its send.
    /// Concurrent adds of one digest write it once: the others wait for
    /// that write and return when it is journaled (or write it themselves
    /// if it failed).
    public func add(_ d: Digest, _ source: BlobSource) throws {
        while true {
            let turn = state.withLock { s -> Bool? in
                if s.entries[d] != nil { return nil }
                return s.adding.insert(d).inserted
            }
            guard let turn else { return }
            if turn { break }
            cond.lock()
            if state.withLock({ $0.adding.contains(d) }) { _ = cond.wait(until: Date().addingTimeInterval(0.5)) }
            cond.unlock()
        }
        var journaled = false
        defer {
            state.withLock { s in
                if journaled, s.entries[d] == nil { s.entries[d] = Entry(added: Date()) }
                s.adding.remove(d)
            }
            signal()
        }
        try write(d, source)
        journaled = true
    }

    /// Writes `source` as `d`'s entry: a temporary file of this writer's
    /// own (`<entry>.partial.XXXXXX`), synced, renamed into place.
    private func write(_ d: Digest, _ source: BlobSource) throws {
        let final = path(d)
        var template = Array((final + ".partial.XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { casfs_mkstemp_cloexec($0.baseAddress!) }
        guard fd >= 0 else { throw StorageError.posix("journal \(final).partial") }
        let partial = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        do {
            defer { close(fd) }
            if let from = source.fileDescriptor, try copyFile(from: from, to: fd, size: source.size) {
                // copied in the kernel
            } else {
                guard lseek(fd, 0, SEEK_SET) == 0, ftruncate(fd, 0) == 0 else { throw StorageError.posix("journal \(partial)") }
                try source.forEachChunk { chunk in try chunk.withUnsafeBytes { try writeFully(fd, $0) } }
            }
            guard fsync(fd) == 0 else { throw StorageError.posix("fsync \(partial)") }
        } catch {
            unlink(partial)
            throw error
        }
        checked.withLock { _ = $0.removeValue(forKey: d) }
        guard rename(partial, final) == 0 else {
            let e = StorageError.posix("journal \(final)")
            unlink(partial)
            throw e
        }
        syncDirectory()
    }

    /// Forgets a blob that was deleted before it was sent (unless a send is under way).
    public func cancel(_ d: Digest) {
        let removed = state.withLock { s -> Bool in
            guard let e = s.entries[d], !e.running else { return false }
            s.entries[d] = nil
            return true
        }
        if removed {
            unlink(path(d))
            checked.withLock { _ = $0.removeValue(forKey: d) }
        }
    }

    /// Queues what the directory holds (from before a crash or an unmount)
    /// and starts sending to `fallback`. `onSend` is told how each send ended
    /// (nil: the fallback has the blob). `repairSource` gives a proven copy
    /// of a blob whose entry is damaged (the cache's), if there is one.
    public func start(sendingTo fallback: any Storage, onSend: (@Sendable (Error?) -> Void)? = nil,
                      repairSource: (@Sendable (Digest) -> BlobSource?)? = nil) {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        var recovered = 0
        for n in names {
            if let r = n.range(of: ".partial") {
                // A temporary of a writer that died; not one an add is writing now.
                let writing = Digest(parsing: String(n[..<r.lowerBound])).map { d in state.withLock { $0.adding.contains(d) } } ?? false
                if !writing { unlink(directory + "/" + n) }
                continue
            }
            guard let d = Digest(parsing: n) else { continue }
            var st = stat()
            guard lstat(directory + "/" + n, &st) == 0 else { continue }
            if let why = DeferredWriteJournal.refusal(st, d) {
                damaged.add()
                log.error("journal entry \(n) refused: \(why); moved to \(moveAside(n, to: "damaged") ?? "nowhere (removed)")")
                continue
            }
            state.withLock { s in
                if s.entries[d] == nil { s.entries[d] = Entry(added: Date(timeIntervalSince1970: Double(st.st_mtim.tv_sec))) }
            }
            recovered += 1
        }
        if recovered > 0 { log.notice("re-sending \(recovered) deferred writes found in \(directory)") }
        let first = state.withLock { s -> Bool in
            s.fallback = fallback
            s.onSend = onSend
            s.repairSource = repairSource
            defer { s.started = true }
            return !s.started
        }
        guard first else { return }
        for i in 0..<threads {
            let t = Thread { [self] in work() }
            t.name = "casfs-deferred-\(i)"
            t.start()
        }
    }

    /// Waits up to `timeout` seconds for every queued send, then stops the
    /// threads; what was not sent stays in the journal for the next start.
    public func stop(timeout: Double = 30) {
        let deadline = Date().addingTimeInterval(state.withLock { $0.started } ? timeout : 0)
        cond.lock()
        while pending > 0, Date() < deadline { _ = cond.wait(until: min(deadline, Date().addingTimeInterval(0.1))) }
        cond.unlock()
        let left = state.withLock { s -> Int in
            s.stopping = true
            return s.entries.count
        }
        signal()
        if left > 0 { log.warning("\(left) deferred writes not sent yet; they stay in \(directory) and are sent at the next start") }
    }

    private func signal() {
        cond.lock()
        cond.broadcast()
        cond.unlock()
    }

    private func syncDirectory() {
        let dfd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 {
            fsync(dfd)
            close(dfd)
        }
    }

    // MARK: checking entries

    /// Why an entry with this `lstat` cannot be `d`'s bytes, or nil.
    static func refusal(_ st: stat, _ d: Digest) -> String? {
        switch st.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFLNK: return "a symbolic link (never followed)"
        default: return "not a regular file"
        }
        if st.st_uid != geteuid() { return "owned by uid \(st.st_uid), not by this daemon's user" }
        if st.st_nlink != 1 { return "\(st.st_nlink) links to one file (an entry has one)" }
        if Int64(st.st_size) != d.size { return "\(st.st_size) bytes, not \(d.size)" }
        return nil
    }

    enum Checked {
        case good(JournalEntrySource)
        case bad(String)
        case absent
        var source: BlobSource? { if case .good(let s) = self { return s } else { return nil } }
    }

    /// Opens `d`'s entry (no links followed, a regular file of this user)
    /// and hashes it unless it was hashed at this very change time before.
    func check(_ d: Digest) -> Checked {
        let fd = open(path(d), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else {
            if errno == ENOENT { return .absent }
            if errno == ELOOP { return .bad("a symbolic link (never followed)") }
            return .bad("cannot be opened: \(String(cString: strerror(errno)))")
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            close(fd)
            return .bad("fstat failed: \(String(cString: strerror(errno)))")
        }
        if let why = DeferredWriteJournal.refusal(st, d) {
            close(fd)
            return .bad(why)
        }
        let stamp = FileStamp(st)
        let source = JournalEntrySource(fd: fd, digest: d, stamp: stamp)
        if checked.withLock({ $0[d] }) == stamp { return .good(source) }
        var hasher = DigestHasher()
        let chunk = Int(min(Int64(streamChunkSize), max(1, d.size)))
        var buf = [UInt8](repeating: 0, count: chunk)
        var offset: Int64 = 0
        while offset < d.size {
            let want = Int(min(Int64(chunk), d.size - offset))
            let n: Int
            do { n = try buf.withUnsafeMutableBytes { try source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<want]), offset: offset) } } catch {
                return .bad("\(error)")
            }
            guard n == want else { return .bad("ended after \(offset + Int64(n)) bytes") }
            buf.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            offset += Int64(n)
        }
        let actual = hasher.finalize()
        guard actual == d else { return .bad("its bytes hash to \(actual.hash)") }
        checked.withLock { $0[d] = stamp }
        return .good(source)
    }

    /// Moves a bad entry aside, counts and logs it, and puts the cache's
    /// proven copy in its place if there is one; else the write is dropped.
    /// True if the entry was replaced.
    /// One quarantine of a digest at a time, and each looks at the entry
    /// again first: a reader and a sender that both found it bad handle it
    /// once, and a proven copy that replaced it is never moved aside.
    @discardableResult
    func quarantine(_ d: Digest, _ why: String) -> Bool {
        while !state.withLock({ $0.quarantining.insert(d).inserted }) {
            cond.lock()
            if state.withLock({ $0.quarantining.contains(d) }) { _ = cond.wait(until: Date().addingTimeInterval(0.5)) }
            cond.unlock()
        }
        defer {
            state.withLock { _ = $0.quarantining.remove(d) }
            signal()
        }
        var why = why
        switch check(d) {
        case .good: return true
        case .absent:
            return false
        case .bad(let now): why = now
        }
        damaged.add()
        checked.withLock { _ = $0.removeValue(forKey: d) }
        let aside = moveAside(d.description, to: "damaged")
        log.error("journal entry of \(d) is damaged: \(why); moved to \(aside ?? "nowhere (removed)")")
        let repair = state.withLock { $0.repairSource }
        if let good = repair?(d) {
            do {
                try write(d, good)
                log.notice("journal entry of \(d) replaced with the cache's proven copy")
                return true
            } catch {
                log.error("could not replace the journal entry of \(d): \(error)")
            }
        }
        state.withLock { _ = $0.entries.removeValue(forKey: d) }
        unlink(path(d))
        log.error("deferred write of \(d) dropped: its journal entry is damaged and no proven copy is left to send")
        signal()
        return false
    }

    /// Renames `<directory>/<name>` into `<directory>/<sub>/`; the new path, or nil (then it is removed).
    private func moveAside(_ name: String, to sub: String) -> String? {
        let dir = directory + "/" + sub
        mkdir(dir, 0o700)
        let target = "\(dir)/\(name).\(Int(Date().timeIntervalSince1970)).\(UInt16.random(in: 0...UInt16.max))"
        if rename(directory + "/" + name, target) == 0 { return target }
        unlink(directory + "/" + name)
        return nil
    }

    // MARK: sending

    private enum Next { case send(Digest, any Storage), wait(Date?), exit }

    private func work() {
        while true {
            let next = state.withLock { s -> Next in
                if s.stopping { return .exit }
                guard let fallback = s.fallback else { return .wait(nil) }
                let now = Date()
                var pick: (Digest, Entry)?
                var soonest: Date?
                for (d, e) in s.entries where !e.running {
                    if e.notBefore <= now {
                        if pick == nil || e.added < pick!.1.added { pick = (d, e) }
                    } else if soonest == nil || e.notBefore < soonest! {
                        soonest = e.notBefore
                    }
                }
                guard let (d, _) = pick else { return .wait(soonest) }
                s.entries[d]?.running = true
                return .send(d, fallback)
            }
            switch next {
            case .exit:
                return
            case .wait(let until):
                cond.lock()
                _ = cond.wait(until: until ?? Date().addingTimeInterval(1))
                cond.unlock()
            case .send(let d, let fallback):
                send(d, fallback)
            }
        }
    }

    private func send(_ d: Digest, _ fallback: any Storage) {
        var failure: Error?
        switch check(d) {
        case .good(let src):
            do { try fallback.commitWrite(d, src) } catch { failure = error }
        case .absent:
            failure = StorageError.io(errno: ENOENT, "the journal entry of \(d) vanished")
        case .bad(let why):
            // Never sent: replaced by the cache's proven copy and tried again, or dropped.
            let replaced = quarantine(d, why)
            state.withLock { s in
                s.entries[d]?.running = false
                s.entries[d]?.notBefore = .distantPast
            }
            if replaced { signal() }
            return
        }
        if failure != nil, case .bad(let why) = check(d) {
            // The entry changed while it was sent: that, not the fallback, failed.
            let replaced = quarantine(d, why)
            state.withLock { s in
                s.entries[d]?.running = false
                s.entries[d]?.notBefore = .distantPast
            }
            if replaced { signal() }
            return
        }
        if let failure, (failure as? StorageError)?.errno == ENOENT, case .absent = check(d) {
            state.withLock { _ = $0.entries.removeValue(forKey: d) }
            log.error("deferred write of \(d) dropped: its journal entry was removed behind casfs's back")
            signal()
            return
        }
        state.withLock { $0.onSend }?(failure)
        if failure == nil {
            // Removed while the entry is still queued: an add of the blob
            // meanwhile finds it queued and returns (the fallback has it),
            // rather than writing an entry this unlink would take.
            unlink(path(d))
            checked.withLock { _ = $0.removeValue(forKey: d) }
        }
        let permanent = failure.map { StorageError.wrap($0).isPermanent } ?? false
        let (attempts, refusals) = state.withLock { s -> (Int, Int) in
            guard var e = s.entries[d] else { return (0, 0) }
            if failure == nil {
                s.entries[d] = nil
                return (e.attempts, 0)
            }
            e.attempts += 1
            if permanent { e.refusals += 1 }
            e.running = false
            let backoff = min(maxBackoff, 0.5 * pow(2, Double(min(e.attempts - 1, 20))))
            e.notBefore = Date().addingTimeInterval(backoff * Double.random(in: 0.8...1.0))
            if e.refusals >= DeferredWriteJournal.maxRefusals { s.entries[d] = nil } else { s.entries[d] = e }
            return (e.attempts, e.refusals)
        }
        if let failure {
            failures.add()
            if refusals >= DeferredWriteJournal.maxRefusals {
                refused.add()
                checked.withLock { _ = $0.removeValue(forKey: d) }
                let aside = moveAside(d.description, to: "refused")
                log.error("the fallback refuses the deferred write of \(d) for good (\(failure)); no longer sent, its bytes are in \(aside ?? "nowhere (removed)")")
            } else if attempts == 1 {
                log.error("deferred write of \(d) to the fallback failed (retrying with back-off): \(failure)")
            } else {
                log.debug("deferred write of \(d) failed again (attempt \(attempts)): \(failure)")
            }
        } else {
            sent.add()
            if attempts > 0 { log.info("deferred write of \(d) reached the fallback after \(attempts) failed attempts") }
        }
        signal()
    }
}

/// A journal directory that is not safe to use: the message says why.
public struct JournalDirectoryError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// A journal entry, open, whose bytes were checked against its digest when
/// it had `stamp`: every read re-checks the stamp after reading, so bytes
/// changed since are never returned. Not handed to the kernel (no descriptor).
final class JournalEntrySource: BlobSource, @unchecked Sendable {
    let fd: Int32
    let digest: Digest
    let stamp: FileStamp

    init(fd: Int32, digest: Digest, stamp: FileStamp) {
        self.fd = fd
        self.digest = digest
        self.stamp = stamp
    }

    deinit { close(fd) }

    var heldBytes: Int64 { 0 }

    var size: Int64 { digest.size }
    var isVerified: Bool { true }

    func read(offset: Int64, length: Int) throws -> Data {
        guard offset >= 0, length >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        var data = Data(count: Int(max(0, min(Int64(length), size - offset))))
        let n = try data.withUnsafeMutableBytes { try read(into: $0, offset: offset) }
        if n < data.count { data.removeSubrange(n...) }
        return data
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, offset: Int64) throws -> Int {
        guard offset >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        let n = Int(max(0, min(Int64(buffer.count), size - offset)))
        if n == 0 { return 0 }
        let got = try preadFully(fd, buffer.baseAddress!, n, offset)
        guard FileStamp.of(fd: fd) == stamp else {
            throw StorageError.corrupt(digest, source: "the deferred-write journal (the entry changed while it was read)")
        }
        return got
    }
}
