import CASCore
import Foundation
import FuseKernel
import Synchronization

/// Pushes the bytes of small blobs into the kernel's page cache
/// (FUSE_NOTIFY_STORE) once a LOOKUP or READDIRPLUS reply has handed the
/// kernel their inodes, so that the reader's READ never reaches the daemon.
///
/// - Only verified bytes are pushed: what the storage stack returns is
///   checked against its digest on the way (a proven store file, a checked
///   fallback); bytes a source does not vouch for are hashed here first.
/// - Stores are written by threads of their own, never by a request handler:
///   the kernel locks a page while a READ of it is under way, and a store
///   into that page waits for the READ's reply.
/// - The kernel creates an inode only once the reader's thread has taken the
///   reply that names it: a store that comes earlier is refused (ENOENT) and
///   tried again for a while (`patience`). This is why pushing after a
///   LOOKUP does not pay: the reader creates the inode and reads it at once,
///   and the push loses the race nearly every time (measured: 1 in 3 won
///   with a busy wait that cost more CPU than it saved). After a READDIRPLUS
///   the reader goes on listing before it reads, and the pushes win.
/// - A listed directory's files are *offered*: the first of them pushed at
///   once (up to a byte and a file budget), the rest when a READ of any of
///   them shows the directory is being read (storing ahead of the walk).
/// - The race against readers is counted: a store that lands before any
///   READ of its inode won; a READ that comes while its inode's store is
///   queued lost it (the READ is served as usual, the store dropped).
/// - Bounded: blobs up to `maxBlobSize`; at most `maxQueuedBytes` queued and
///   `maxOffered` files offered (older offers are forgotten).
final class PageCacheFeeder: @unchecked Sendable {
    struct Job: Sendable {
        let ino: UInt64
        let digest: Digest
        /// The blob, when the request already opened it; else opened here.
        var source: BlobSource?
        /// Its bytes, when the request already read them (`verified`: known
        /// to match the digest; otherwise they are hashed here).
        var data: Data?
        var verified = false
        init(ino: UInt64, digest: Digest, source: BlobSource? = nil, data: Data? = nil, verified: Bool = false) {
            self.ino = ino
            self.digest = digest
            self.source = source
            self.data = data
            self.verified = verified
        }
    }

    let maxBlobSize: Int64
    let maxQueuedBytes: Int64
    let maxOffered: Int
    /// Pushed at once from one listing; the rest wait for a READ.
    let listingBudgetBytes: Int64
    let listingBudgetFiles: Int
    /// How long a store refused for an inode the kernel does not hold yet is tried again.
    let patience: Duration
    private let storage: any Storage
    private let channel: FuseChannel
    /// Whether inode `ino` still stands for blob `digest` (an offer can wait
    /// long; meanwhile the kernel may forget the inode and its number go to
    /// another blob): asked before every store.
    private let holds: @Sendable (_ ino: UInt64, _ digest: Digest) -> Bool
    private let cond = NSCondition()
    // Guarded by `cond`.
    private var queue: [Job] = []
    private var head = 0
    private var queuedBytes: Int64 = 0
    private var pending: [UInt64: Int] = [:]  // ino → stores queued or under way
    private var overtaken: Set<UInt64> = []   // a READ came while pending
    private var groups: [UInt64: [Job]] = [:] // offered, by directory
    private var groupOf: [UInt64: UInt64] = [:]  // ino → the directory it was offered with
    private var groupOrder: [UInt64] = []
    private var offered = 0
    /// Pushed at once so far, by directory.
    private var spent: [UInt64: (files: Int, bytes: Int64)] = [:]
    private var stopping = false
    private let counters: Counters

    struct Counters: Sendable {
        let won, lost, refused, skipped, bytes: MetricCounter
    }

    init(storage: any Storage, channel: FuseChannel, metrics: Metrics,
         holds: @escaping @Sendable (_ ino: UInt64, _ digest: Digest) -> Bool, threads: Int = 2,
         maxBlobSize: Int64 = 64 << 10, maxQueuedBytes: Int64 = 32 << 20, maxOffered: Int = 200_000,
         listingBudgetBytes: Int64 = 2 << 20, listingBudgetFiles: Int = 512, patience: Duration = .milliseconds(20)) {
        self.storage = storage
        self.channel = channel
        self.holds = holds
        self.maxBlobSize = maxBlobSize
        self.maxQueuedBytes = maxQueuedBytes
        self.maxOffered = maxOffered
        self.listingBudgetBytes = listingBudgetBytes
        self.listingBudgetFiles = listingBudgetFiles
        self.patience = patience
        counters = Counters(won: metrics.counter(MetricCatalog.pageStores),
                            lost: metrics.counter(MetricCatalog.pageStoresLost),
                            refused: metrics.counter(MetricCatalog.pageStoresRefused),
                            skipped: metrics.counter(MetricCatalog.pageStoresSkipped),
                            bytes: metrics.counter(MetricCatalog.pageStoreBytes))
        for i in 0..<max(1, threads) {
            let t = Thread { [self] in run() }
            t.name = "casfs-page-store-\(i)"
            t.start()
        }
    }

    /// Ends the threads (queued stores are dropped).
    func stop() {
        cond.lock()
        stopping = true
        queue = []
        head = 0
        cond.broadcast()
        cond.unlock()
    }

    func wants(_ d: Digest) -> Bool { d.size > 0 && d.size <= maxBlobSize }

    /// Queues stores now (lock held).
    private func enqueue(_ jobs: some Sequence<Job>) -> Int {
        var added = 0
        for j in jobs where wants(j.digest) {
            guard queuedBytes + j.digest.size <= maxQueuedBytes else {
                counters.skipped.add()
                continue
            }
            queue.append(j)
            queuedBytes += j.digest.size
            pending[j.ino, default: 0] += 1
            added += 1
        }
        return added
    }

    /// Pushes these blobs as soon as the kernel holds their inodes (the
    /// reply naming them is sent, or about to be).
    func feed(_ jobs: [Job]) {
        guard !jobs.isEmpty else { return }
        cond.lock()
        if !stopping, enqueue(jobs) > 0 { cond.signal() }
        cond.unlock()
    }

    /// The files a listing of `directory` (its inode) handed the kernel: the
    /// first pushed at once (the directory's budget, over all its listing
    /// pages), the others kept until one of the directory's files is read.
    func offer(_ jobs: [Job], directory: UInt64) {
        cond.lock()
        defer { cond.unlock() }
        guard !stopping else { return }
        var used = spent[directory] ?? (0, 0)
        var now: [Job] = []
        var later: [Job] = []
        for j in jobs where wants(j.digest) {
            if used.files < listingBudgetFiles && used.bytes + j.digest.size <= listingBudgetBytes {
                now.append(j)
                used.files += 1
                used.bytes += j.digest.size
            } else {
                later.append(j)
            }
        }
        if spent.count >= 4096 { spent = [:] }
        spent[directory] = used
        if enqueue(now) > 0 { cond.broadcast() }
        guard !later.isEmpty else { return }
        if groups[directory] == nil { groupOrder.append(directory) }
        groups[directory, default: []] += later
        offered += later.count
        for j in later { groupOf[j.ino] = directory }
        while offered > maxOffered, !groupOrder.isEmpty {
            dropGroup(groupOrder.removeFirst())
        }
    }

    private func dropGroup(_ g: UInt64) {
        guard let jobs = groups.removeValue(forKey: g) else { return }
        offered -= jobs.count
        for j in jobs where groupOf[j.ino] == g { groupOf[j.ino] = nil }
    }

    /// A READ of `ino` reached the daemon: if its store is still queued the
    /// reader won the race (the store is dropped); if it was offered with a
    /// listing, the rest of that listing is pushed now.
    func readArrived(_ ino: UInt64) {
        cond.lock()
        defer { cond.unlock() }
        if pending[ino] != nil, overtaken.insert(ino).inserted { counters.lost.add() }
        guard let g = groupOf[ino], let jobs = groups[g] else { return }
        dropGroup(g)
        groupOrder.removeAll { $0 == g }
        if enqueue(jobs.lazy.filter { $0.ino != ino }) > 0 { cond.broadcast() }
    }

    private func next() -> Job? {
        cond.lock()
        defer { cond.unlock() }
        while head >= queue.count && !stopping { cond.wait() }
        if stopping { return nil }
        let j = queue[head]
        head += 1
        if head >= 1024 && head * 2 >= queue.count {
            queue.removeFirst(head)
            head = 0
        }
        return j
    }

    private func isOvertaken(_ ino: UInt64) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        return overtaken.contains(ino)
    }

    /// Done with a job; true if a READ of its inode came meanwhile.
    private func finish(_ j: Job) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        queuedBytes -= j.digest.size
        let lost = overtaken.contains(j.ino)
        if let n = pending[j.ino], n > 1 {
            pending[j.ino] = n - 1
        } else {
            pending[j.ino] = nil
            overtaken.remove(j.ino)
        }
        return lost
    }

    private func run() {
        while let j = next() {
            let stored = store(j)
            if finish(j) || !stored { continue }
            counters.won.add()
            counters.bytes.add(j.digest.size)
        }
    }

    /// Writes the blob's bytes into the page cache of its inode; true if the kernel took them.
    private func store(_ j: Job) -> Bool {
        guard !isOvertaken(j.ino) else { return false }
        let data: Data
        do {
            let bytes: Data
            let verified: Bool
            if let d = j.data {
                (bytes, verified) = (d, j.verified)
            } else {
                guard let src = try j.source ?? storage.openBlob(j.digest) else {
                    counters.skipped.add()
                    return false
                }
                (bytes, verified) = (try src.readAll(), src.isVerified)
            }
            // Only bytes known to match the name go to the kernel.
            guard Int64(bytes.count) == j.digest.size, verified || Digest.of(bytes) == j.digest else {
                counters.skipped.add()
                return false
            }
            data = bytes
        } catch {
            counters.skipped.add()
            return false
        }
        let start = ContinuousClock.now
        let deadline = start + patience
        while true {
            if isOvertaken(j.ino) { return false }
            guard holds(j.ino, j.digest) else {
                counters.skipped.add()
                return false
            }
            let rc = data.withUnsafeBytes { channel.store(j.ino, $0) }
            if rc == 0 { return true }
            // ENOENT: the reader has not taken the reply yet; try again shortly.
            guard rc == ENOENT, ContinuousClock.now < deadline else {
                counters.refused.add()
                if rc != ENOENT {
                    folded.warning(kind: "page store", key: "errno \(rc)",
                                   "pushing \(j.digest) into the page cache failed: \(String(cString: strerror(rc)))")
                }
                return false
            }
            // The reader is about to take the reply: yield at first, then
            // sleep a little (on two CPUs, spinning would keep it waiting).
            if ContinuousClock.now - start < .microseconds(50) { sched_yield() } else { usleep(100) }
        }
    }
}
