import CASCore
import Foundation
import Synchronization

/// Fallback writes a with-cache storage has deferred, kept on disk until the
/// fallback has them: one file per blob (`<directory>/<hash>_<size>`) holding
/// its bytes, written and synced before the write is acknowledged. Threads
/// send them to the fallback in the background; a failed send is retried with
/// back-off (0.5 s doubling to `maxBackoff`), never dropped. After a crash or
/// an unmount with sends outstanding, `start` queues what the directory holds.
public final class DeferredWriteJournal: Sendable {
    public let directory: String
    public let threads: Int
    public let maxBackoff: Double

    private struct Entry {
        var added: Date
        var attempts = 0
        var notBefore: Date = .distantPast
        var running = false
    }

    private struct State {
        var entries: [Digest: Entry] = [:]
        var fallback: (any Storage)?
        var onSend: (@Sendable (Error?) -> Void)?
        var started = false
        var stopping = false
    }

    private let state = Mutex(State())
    private let cond = NSCondition()
    private let sent: MetricCounter
    private let failures: MetricCounter

    public init(directory: String, threads: Int = 8, maxBackoff: Double = 60,
                metrics: MetricScope = .standalone("journal")) throws {
        self.directory = directory
        self.threads = max(1, threads)
        self.maxBackoff = maxBackoff
        sent = metrics.counter(MetricCatalog.deferredSent)
        failures = metrics.counter(MetricCatalog.deferredFailures)
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw StorageError.io(errno: EACCES, "cannot create the journal directory \(directory): \(error.localizedDescription)")
        }
        let queued = metrics.gauge(MetricCatalog.deferredQueued)
        let oldest = metrics.gauge(MetricCatalog.deferredOldestAge)
        metrics.metrics.onCollect { [weak self] in
            guard let self else { return }
            queued.set(Int64(pending))
            oldest.set(oldestAge)
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

    /// The journaled bytes of `d`, if it waits to be sent.
    public func source(_ d: Digest) -> BlobSource? {
        guard contains(d) else { return nil }
        guard let f = try? FileSource(path: path(d)), f.size == d.size else { return nil }
        return FileSource(fd: fcntl(f.fd, F_DUPFD_CLOEXEC, 0), size: f.size, verified: true)
    }

    func path(_ d: Digest) -> String { directory + "/" + d.description }

    /// Journals `d` durably (bytes and name synced) and queues its send.
    public func add(_ d: Digest, _ source: BlobSource) throws {
        if contains(d) { return }
        let final = path(d)
        let partial = final + ".partial"
        let fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw StorageError.posix("journal \(partial)") }
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
        guard rename(partial, final) == 0 else {
            let e = StorageError.posix("journal \(final)")
            unlink(partial)
            throw e
        }
        syncDirectory()
        state.withLock { s in
            if s.entries[d] == nil { s.entries[d] = Entry(added: Date()) }
        }
        signal()
    }

    /// Forgets a blob that was deleted before it was sent (unless a send is under way).
    public func cancel(_ d: Digest) {
        let removed = state.withLock { s -> Bool in
            guard let e = s.entries[d], !e.running else { return false }
            s.entries[d] = nil
            return true
        }
        if removed { unlink(path(d)) }
    }

    /// Queues what the directory holds (from before a crash or an unmount)
    /// and starts sending to `fallback`. `onSend` is told how each send ended
    /// (nil: the fallback has the blob).
    public func start(sendingTo fallback: any Storage, onSend: (@Sendable (Error?) -> Void)? = nil) {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        var recovered = 0
        for n in names {
            if n.hasSuffix(".partial") {
                unlink(directory + "/" + n)
                continue
            }
            guard let d = Digest(parsing: n) else { continue }
            var st = stat()
            guard stat(directory + "/" + n, &st) == 0, Int64(st.st_size) == d.size else {
                log.error("journal entry \(n) has the wrong length; dropped")
                unlink(directory + "/" + n)
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
        do {
            let src = try FileSource(path: path(d))
            guard src.size == d.size else { throw StorageError.sizeMismatch(expected: d, actualSize: src.size) }
            try fallback.commitWrite(d, FileSource(fd: fcntl(src.fd, F_DUPFD_CLOEXEC, 0), size: d.size, verified: true))
        } catch {
            failure = error
        }
        state.withLock { $0.onSend }?(failure)
        let attempts = state.withLock { s -> Int in
            guard var e = s.entries[d] else { return 0 }
            if failure == nil {
                s.entries[d] = nil
                return e.attempts
            }
            e.attempts += 1
            e.running = false
            let backoff = min(maxBackoff, 0.5 * pow(2, Double(min(e.attempts - 1, 20))))
            e.notBefore = Date().addingTimeInterval(backoff * Double.random(in: 0.8...1.0))
            s.entries[d] = e
            return e.attempts
        }
        if let failure {
            failures.add()
            if attempts == 1 {
                log.error("deferred write of \(d) to the fallback failed (retrying with back-off): \(failure)")
            } else {
                log.debug("deferred write of \(d) failed again (attempt \(attempts)): \(failure)")
            }
        } else {
            unlink(path(d))
            sent.add()
            if attempts > 0 { log.info("deferred write of \(d) reached the fallback after \(attempts) failed attempts") }
        }
        signal()
    }
}
