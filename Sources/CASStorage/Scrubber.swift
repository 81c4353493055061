import CASCore
import CLinux
import Foundation
import Synchronization

/// One `!disk-storage` of a stack to scrub, with what its repairs go through.
public struct ScrubTarget: Sendable {
    /// The node's place in the configuration (`storage.fallback.storage`).
    public let name: String
    public let disk: DiskStorage
    /// The index over this store, if any: a removed copy leaves it too
    /// (and `total_size` with it).
    public let index: RedisIndex?
    /// Other storages that may hold a good copy (the fallback of a cache,
    /// the other replicas), each checking what it returns, with their names.
    public let repairSources: [(name: String, storage: any Storage)]

    public init(name: String, disk: DiskStorage, index: RedisIndex?, repairSources: [(name: String, storage: any Storage)]) {
        self.name = name
        self.disk = disk
        self.index = index
        self.repairSources = repairSources
    }
}

/// What scrub did about one damaged store file.
public enum ScrubRepair: Sendable, Equatable {
    /// Replaced with verified bytes from the named storage.
    case repaired(from: String)
    /// Removed from the store (and its index).
    case removed
    /// Replaced or removed by someone else meanwhile: nothing to do.
    case changedMeanwhile
    /// `--dry-run`: left as it is.
    case leftAlone
    /// The repair failed (the message says why); the file is as it was.
    case failed(String)
}

/// A damaged store file: its name, what it holds instead, what was done.
public struct ScrubFinding: Sendable {
    public let target: String
    public let digest: Digest
    public let problem: String
    public let repair: ScrubRepair
}

/// Where a pass stands (for a progress bar).
public struct ScrubProgress: Sendable {
    public let objects: Int64
    public let bytes: Int64
    public let damaged: Int64
    /// How far through the store, from the cursor's hash (hashes are
    /// spread evenly): 0 ... 1.
    public let fraction: Double
}

/// The outcome of one pass (or of the part of it one run did).
public struct ScrubSummary: Sendable {
    public var target = ""
    /// This run.
    public var objects: Int64 = 0
    public var bytes: Int64 = 0
    public var damaged: Int64 = 0
    public var repaired: Int64 = 0
    public var removed: Int64 = 0
    /// Files that changed while they were hashed, or vanished: not judged.
    public var skipped: Int64 = 0
    /// Where this run began (nil: at the start of a pass).
    public var resumedAfter: String?
    /// The pass is complete (false: stopped; the cursor is kept).
    public var complete = false
    public init() {}
}

/// The scrub state of a store, kept in `<root>/scrub.state` (JSON): the
/// cursor of the pass under way and when the last passes ran. Read as
/// untrusted input: anything malformed starts a new pass.
public struct ScrubState: Codable, Sendable, Equatable {
    public var version = 1
    /// The last object hash checked in the pass under way (nil: no pass under way).
    public var cursor: String?
    public var passStarted: Double?
    public var passObjects: Int64 = 0
    public var passBytes: Int64 = 0
    public var passDamaged: Int64 = 0
    public var lastPassStarted: Double?
    public var lastPassFinished: Double?
    public var lastPassObjects: Int64 = 0
    public var lastPassBytes: Int64 = 0
    public var lastPassDamaged: Int64 = 0

    public init() {}

    public static func path(_ root: String) -> String { root + "/scrub.state" }

    public static func load(_ root: String) -> ScrubState {
        guard let data = FileManager.default.contents(atPath: path(root)), data.count < 1 << 16 else { return ScrubState() }
        guard var s = try? JSONDecoder().decode(ScrubState.self, from: data), s.version == 1 else {
            log.warning("\(path(root)) is not a scrub state; a new pass starts")
            return ScrubState()
        }
        if let c = s.cursor, c.utf8.count != 64 || !c.utf8.allSatisfy(Digest.isLowerHexByte) {
            s.cursor = nil
        }
        for v in [s.passObjects, s.passBytes, s.passDamaged, s.lastPassObjects, s.lastPassBytes, s.lastPassDamaged] where v < 0 {
            return ScrubState()
        }
        return s
    }

    /// Written to a temporary file and renamed into place.
    func save(_ root: String) throws {
        let data = try JSONEncoder().encode(self)
        let final = ScrubState.path(root)
        let temp = final + ".tmp"
        guard FileManager.default.createFile(atPath: temp, contents: data), rename(temp, final) == 0 else {
            unlink(temp)
            throw StorageError.posix("write \(final)")
        }
    }
}

/// Re-hashes every object of a disk store at a bounded rate and repairs
/// what does not match its name: media damage that changed no metadata is
/// found here, where no proof can see it.
///
/// - Objects are taken in hash order; the last one checked is the cursor,
///   kept in `<root>/scrub.state`, so a pass stopped or killed resumes
///   after it. One scrub per store at a time (`<root>/scrub.lock`).
/// - Files are read with O_DIRECT where the filesystem allows it, so the
///   bytes on the medium are checked, not a cached copy.
/// - A file that changes while it is hashed, or is replaced or deleted
///   meanwhile (a mount, cleanup or a BuildGrid sharing the store), is
///   not judged; objects appear whole (temporary file, then link), so a
///   file being written is never seen half-written.
/// - A damaged file is replaced with verified bytes from a repair source
///   (atomically, only if it is still the damaged file), else removed from
///   the store and its index (`RedisIndex.removeDamaged`).
public final class Scrubber: @unchecked Sendable {
    public let target: ScrubTarget
    /// Bytes per second (0: as fast as the disk goes).
    public let rate: Int64
    public let dryRun: Bool
    let counters: Counters
    private let shouldStop: @Sendable () -> Bool
    /// A blob whose stored copy was replaced or removed (to drop what a
    /// kernel holds of it).
    private let onChange: (@Sendable (Digest) -> Void)?

    struct Counters: Sendable {
        let objects, bytes, damaged, repaired, removed, passes: MetricCounter
        let passStart, passEnd: MetricGauge
        init(_ m: MetricScope) {
            objects = m.counter(MetricCatalog.scrubObjects)
            bytes = m.counter(MetricCatalog.scrubBytes)
            damaged = m.counter(MetricCatalog.scrubDamaged)
            repaired = m.counter(MetricCatalog.scrubRepaired)
            removed = m.counter(MetricCatalog.scrubRemoved)
            passes = m.counter(MetricCatalog.scrubPasses)
            passStart = m.gauge(MetricCatalog.scrubPassStart)
            passEnd = m.gauge(MetricCatalog.scrubPassEnd)
        }
    }

    static let chunk = 1 << 20

    public init(_ target: ScrubTarget, rate: Int64, dryRun: Bool = false, metrics: MetricScope,
                shouldStop: @escaping @Sendable () -> Bool = { false }, onChange: (@Sendable (Digest) -> Void)? = nil) {
        self.target = target
        self.rate = max(0, rate)
        self.dryRun = dryRun
        self.counters = Counters(metrics)
        self.shouldStop = shouldStop
        self.onChange = onChange
        let last = ScrubState.load(target.disk.root)
        if let s = last.lastPassStarted, let e = last.lastPassFinished {
            counters.passStart.set(s)
            counters.passEnd.set(e)
        }
    }

    public struct Busy: Error, CustomStringConvertible {
        public let root: String
        public var description: String {
            "a scrub of \(root) is already running (another `casfs scrub`, or a mount's background scrub)"
        }
    }

    /// Runs (or resumes) one pass. `report` hears of every damaged file as
    /// it is handled, `progress` of the pass's progress. Throws `Busy` when
    /// another scrub holds the store.
    public func run(report: (ScrubFinding) -> Void = { _ in },
                    progress: ((ScrubProgress) -> Void)? = nil) throws -> ScrubSummary {
        let root = target.disk.root
        var lock: Int32 = -1
        if !dryRun {
            lock = open(root + "/scrub.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
            guard lock >= 0 else { throw StorageError.posix("open \(root)/scrub.lock") }
            guard flock(lock, LOCK_EX | LOCK_NB) == 0 else {
                close(lock)
                throw Busy(root: root)
            }
        }
        defer { if lock >= 0 { close(lock) } }

        var state = dryRun ? ScrubState() : ScrubState.load(root)
        var summary = ScrubSummary()
        summary.target = target.name
        summary.resumedAfter = state.cursor
        if state.cursor == nil {
            state.passStarted = Date().timeIntervalSince1970
            state.passObjects = 0
            state.passBytes = 0
            state.passDamaged = 0
        }
        let pacer = Pacer(rate: rate)
        var lastSave = Date()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Scrubber.chunk, alignment: 4096)
        defer { buffer.deallocate() }

        func save(force: Bool = false) {
            guard !dryRun, force || Date().timeIntervalSince(lastSave) >= 0.5 else { return }
            lastSave = Date()
            do { try state.save(root) } catch { log.warning("scrub of \(root): cannot keep its cursor: \(error)") }
        }

        let resumeAfter = state.cursor ?? ""
        let resumePrefix = String(resumeAfter.prefix(2))
        outer: for prefix in target.disk.objectPrefixes() where prefix >= resumePrefix {
            let names = target.disk.objectNames(prefix: prefix)
            for name in names {
                let hash = prefix + name
                if hash <= resumeAfter { continue }
                if shouldStop() { break outer }
                let outcome = check(hash, prefix: prefix, name: name, buffer: buffer, pacer: pacer)
                switch outcome {
                case .stopped:
                    break outer
                case .skipped:
                    summary.skipped += 1
                case .intact(let size):
                    counters.objects.add()
                    summary.objects += 1
                    summary.bytes = summary.bytes.saturatingAdd(size)
                    state.passObjects = state.passObjects.saturatingAdd(1)
                    state.passBytes = state.passBytes.saturatingAdd(size)
                case .damaged(let digest, let stamp, let problem):
                    counters.objects.add()
                    summary.objects += 1
                    summary.bytes = summary.bytes.saturatingAdd(digest.size)
                    summary.damaged += 1
                    state.passObjects = state.passObjects.saturatingAdd(1)
                    state.passBytes = state.passBytes.saturatingAdd(digest.size)
                    state.passDamaged = state.passDamaged.saturatingAdd(1)
                    counters.damaged.add()
                    // Whatever is done about it, the damaged file is proven no more.
                    let current = voidProofs(digest, stamp)
                    let repair = dryRun ? .leftAlone : self.repair(digest, current)
                    switch repair {
                    case .repaired:
                        summary.repaired += 1
                        counters.repaired.add()
                    case .removed:
                        summary.removed += 1
                        counters.removed.add()
                    default: break
                    }
                    // Also when left as it is: what a kernel holds of it was proven, and is no more.
                    onChange?(digest)
                    let finding = ScrubFinding(target: target.name, digest: digest, problem: problem, repair: repair)
                    log.error("scrub: damaged \(digest) in \(target.name) (\(root)): \(problem); \(Scrubber.describe(repair))")
                    report(finding)
                }
                state.cursor = hash
                save()
                progress?(ScrubProgress(objects: state.passObjects, bytes: state.passBytes, damaged: state.passDamaged,
                                        fraction: Scrubber.fraction(hash)))
            }
            if !dryRun { target.disk.removeStaleProofs(prefix: prefix, objects: names) }
        }
        if shouldStop() {
            save(force: true)
            return summary
        }
        // Every object after the cursor was checked: the pass is complete.
        summary.complete = true
        let now = Date().timeIntervalSince1970
        state.lastPassStarted = state.passStarted ?? now
        state.lastPassFinished = now
        state.lastPassObjects = state.passObjects
        state.lastPassBytes = state.passBytes
        state.lastPassDamaged = state.passDamaged
        state.cursor = nil
        state.passStarted = nil
        save(force: true)
        counters.passes.add()
        counters.passStart.set(state.lastPassStarted ?? now)
        counters.passEnd.set(now)
        progress?(ScrubProgress(objects: state.lastPassObjects, bytes: state.lastPassBytes, damaged: state.lastPassDamaged, fraction: 1))
        return summary
    }

    static func isRepaired(_ r: ScrubRepair) -> Bool {
        if case .repaired = r { return true }
        return false
    }

    public static func describe(_ r: ScrubRepair) -> String {
        switch r {
        case .repaired(let from): return "repaired from \(from)"
        case .removed: return "removed from the store and its index"
        case .changedMeanwhile: return "replaced or removed meanwhile by another writer; left to it"
        case .leftAlone: return "left as it is (dry run)"
        case .failed(let why): return "could not be repaired: \(why)"
        }
    }

    /// 0 ... 1 from the first four hex digits of a hash.
    static func fraction(_ hash: String) -> Double {
        Double(UInt32(hash.prefix(4), radix: 16) ?? 0) / 65536
    }

    enum Outcome {
        case intact(Int64)
        case damaged(Digest, FileStamp, String)
        case skipped
        case stopped
    }

    /// Hashes one object file.
    private func check(_ hash: String, prefix: String, name: String, buffer: UnsafeMutableRawBufferPointer,
                       pacer: Pacer) -> Outcome {
        let path = "\(target.disk.objectsDir)/\(prefix)/\(name)"
        let flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK
        var direct = true
        var fd = open(path, flags | casfs_o_direct())
        if fd < 0 && errno == EINVAL {
            direct = false
            fd = open(path, flags)
        }
        guard fd >= 0 else {
            let e = errno
            if e == ENOENT { return .skipped }  // deleted meanwhile
            if e == ELOOP, let st = FileStamp.of(path: path), let d = try? Digest(hash: hash, size: st.size) {
                return .damaged(d, st, "a symbolic link, not a file")
            }
            log.warning("scrub: cannot open \(path): \(String(cString: strerror(e)))")
            return .skipped
        }
        defer { close(fd) }
        guard let before = FileStamp.of(fd: fd) else { return .skipped }
        var st = stat()
        fstat(fd, &st)
        guard let digest = try? Digest(hash: hash, size: before.size) else { return .skipped }
        guard (st.st_mode & S_IFMT) == S_IFREG else { return .damaged(digest, before, "not a regular file") }

        var hasher = DigestHasher()
        var offset: Int64 = 0
        var readError: String?
        while offset < before.size {
            pacer.wait(shouldStop)
            if shouldStop() { return .stopped }
            let want = Int(min(Int64(buffer.count), before.size - offset))
            // O_DIRECT reads whole aligned blocks; the tail is read short.
            let ask = direct ? (want + 4095) & ~4095 : want
            let n = pread(fd, buffer.baseAddress, ask, off_t(offset))
            if n < 0 {
                if errno == EINTR { continue }
                if direct && errno == EINVAL {
                    direct = false
                    let flagsNow = fcntl(fd, F_GETFL)
                    _ = fcntl(fd, F_SETFL, flagsNow & ~casfs_o_direct())
                    continue
                }
                readError = "read error at byte \(offset): \(String(cString: strerror(errno)))"
                break
            }
            if n == 0 { break }
            let used = min(n, want)
            hasher.update(UnsafeRawBufferPointer(rebasing: buffer[0..<used]))
            offset += Int64(used)
            pacer.spent(Int64(used))
            counters.bytes.add(Int64(used))
        }
        // A file that changed while it was read (a writer, a rename) is not judged.
        guard let after = FileStamp.of(fd: fd), after == before else { return .skipped }
        if let readError { return stillThere(path, before) ? .damaged(digest, before, readError) : .skipped }
        guard offset == before.size else {
            return stillThere(path, before) ? .damaged(digest, before, "ended after \(offset) of \(before.size) bytes") : .skipped
        }
        let actual = hasher.finalize()
        if actual == digest {
            if !dryRun && !target.disk.isProven(digest, before) { target.disk.recordProof(digest, before) }
            return .intact(before.size)
        }
        return stillThere(path, before) ? .damaged(digest, before, "its bytes hash to \(actual.hash)") : .skipped
    }

    private func stillThere(_ path: String, _ stamp: FileStamp) -> Bool {
        FileStamp.of(path: path)?.proves(stamp) == true
    }

    /// Voids every proof of the damaged file found with `stamp`: this
    /// process's (forgotten) and every other's (a proof binds the change
    /// time: setting the file's mode to what it is moves it). Returns the
    /// file's stamp after that (the repair names the file by it), or
    /// `stamp` if the file was replaced or removed meanwhile.
    func voidProofs(_ d: Digest, _ stamp: FileStamp) -> FileStamp {
        target.disk.proofs.forget(d)
        let path = target.disk.objectPath(d)
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else { return stamp }  // a symbolic link is never served; gone is gone
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, FileStamp(st).proves(stamp) else { return stamp }
        // The clock behind ctime is coarse: a change within its tick may leave ctime as it was.
        for attempt in 0..<50 {
            if attempt > 0 { usleep(2_000) }
            guard fchmod(fd, st.st_mode & 0o7777) == 0 else {
                log.warning("scrub: cannot void the proofs of the damaged \(path) (chmod: \(String(cString: strerror(errno)))); other processes may still take it as proven until it is repaired")
                return stamp
            }
            guard let now = FileStamp.of(fd: fd) else { return stamp }
            if !now.proves(stamp) { return now }
        }
        log.warning("scrub: the change time of the damaged \(path) did not move; other processes may still take it as proven until it is repaired")
        return stamp
    }

    /// Replaces the damaged copy with verified bytes from a repair source,
    /// else removes it from the store and its index.
    private func repair(_ d: Digest, _ stamp: FileStamp) -> ScrubRepair {
        let disk = target.disk
        for source in target.repairSources {
            do {
                guard let good = try source.storage.getBlob(d) else { continue }
                // Sources check what they return; checked again here, cheaply for a proven copy.
                if !good.isVerified { try good.verify(d) }
                return try disk.replace(d, good, ifStill: stamp) ? .repaired(from: source.name) : .changedMeanwhile
            } catch {
                log.warning("scrub: \(source.name) could not supply \(d): \(error)")
            }
        }
        do {
            if let index = target.index {
                let removed = try index.removeDamaged(d, withdraw: { try disk.withdraw(d, ifStill: stamp) }, discard: disk.discard)
                return removed ? .removed : .changedMeanwhile
            }
            guard let w = try disk.withdraw(d, ifStill: stamp) else { return .changedMeanwhile }
            disk.discard(w)
            return .removed
        } catch {
            return .failed("\(error)")
        }
    }
}

/// Keeps a byte stream at or below `rate` bytes per second, measured from
/// the first byte: before each read, waits until the bytes so far are
/// within what the elapsed time allows.
final class Pacer: @unchecked Sendable {
    let rate: Int64
    private var start: ContinuousClock.Instant?
    private var spentBytes: Int64 = 0

    init(rate: Int64) { self.rate = rate }

    func spent(_ n: Int64) { spentBytes = spentBytes.saturatingAdd(n) }

    func wait(_ stop: () -> Bool) {
        guard rate > 0 else { return }
        let now = ContinuousClock.now
        guard let start else {
            self.start = now
            return
        }
        let due = Double(spentBytes) / Double(rate)
        var elapsed = Self.seconds(now - start)
        while elapsed < due && !stop() {
            usleep(UInt32(min(0.2, due - elapsed) * 1_000_000))
            elapsed = Self.seconds(ContinuousClock.now - start)
        }
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }
}

/// Scrubs a mount's disk stores in the background: a pass every
/// `interval` seconds (counted from the start of the previous pass; a pass
/// stopped by an unmount resumes at the next mount), at `rate` bytes per
/// second, one store after the other, on a thread of its own.
public final class BackgroundScrub: Sendable {
    private let stopping = Atomic<Bool>(false)
    private let wake = NSCondition()
    private let finished = DispatchSemaphore(value: 0)

    /// Starts the thread; nil when there is nothing to scrub.
    public static func start(_ targets: [ScrubTarget], interval: Double, rate: Int64, metrics: Metrics,
                             onChange: (@Sendable (Digest) -> Void)? = nil) -> BackgroundScrub? {
        guard !targets.isEmpty, interval > 0 else { return nil }
        let b = BackgroundScrub()
        let scrubbers = targets.map { t in
            Scrubber(t, rate: rate, metrics: MetricScope(metrics, node: t.name),
                     shouldStop: { [weak b] in b?.stopping.load(ordering: .relaxed) ?? true }, onChange: onChange)
        }
        let t = Thread { b.loop(scrubbers, interval: interval) }
        t.name = "casfs-scrub"
        t.start()
        log.info("background scrub of \(targets.count) disk store(s) every \(Int(interval)) s at \(rate >> 20) MiB/s")
        return b
    }

    private func loop(_ scrubbers: [Scrubber], interval: Double) {
        defer { finished.signal() }
        while !stopping.load(ordering: .relaxed) {
            var next = Date.distantFuture
            for s in scrubbers {
                if stopping.load(ordering: .relaxed) { return }
                let state = ScrubState.load(s.target.disk.root)
                let due = state.cursor != nil ? Date.distantPast
                    : Date(timeIntervalSince1970: (state.lastPassStarted ?? 0) + interval)
                if due <= Date() {
                    do {
                        let r = try s.run()
                        if r.complete {
                            log.info("scrub of \(s.target.name) (\(s.target.disk.root)) done: \(r.objects) files checked, \(r.damaged) damaged (\(r.repaired) repaired, \(r.removed) removed)")
                        }
                        next = min(next, Date().addingTimeInterval(r.complete ? interval : 60))
                    } catch let e as Scrubber.Busy {
                        log.info("\(e); trying again in a minute")
                        next = min(next, Date().addingTimeInterval(60))
                    } catch {
                        log.error("scrub of \(s.target.name) failed: \(error); trying again in a minute")
                        next = min(next, Date().addingTimeInterval(60))
                    }
                } else {
                    next = min(next, due)
                }
            }
            wake.lock()
            while !stopping.load(ordering: .relaxed) && Date() < next {
                _ = wake.wait(until: min(next, Date().addingTimeInterval(60)))
            }
            wake.unlock()
        }
    }

    /// Stops the pass under way (its cursor is kept) and the thread.
    public func stop() {
        stopping.store(true, ordering: .relaxed)
        wake.lock()
        wake.broadcast()
        wake.unlock()
        _ = finished.wait(timeout: .now() + 10)
    }
}
