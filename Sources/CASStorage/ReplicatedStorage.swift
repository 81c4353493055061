import CASCore
import Foundation

/// Every blob kept in all of several storages, with BuildGrid's
/// `!replicated-storage` semantics:
/// - writes go to every replica and fail only if all of them fail;
/// - reads take the first replica (in configured order) that has the blob;
///   with read replication, the replicas found lacking it get a copy: at once
///   for `getBlob` and bulk reads (as BuildGrid), in the background for
///   `openBlob`/`read`, which stay cheap;
/// - a blob is missing when it is missing from every replica; one missing
///   from only some is queued for background replication when the queue is
///   enabled (`replicationQueueSize` > 0; a full queue drops, as BuildGrid's).
///
/// Where casfs differs from BuildGrid: a replica that fails is passed over
/// (its error is thrown only when the others cannot answer: none has the
/// blob, or none replied at all), and one whose copy failed its check (and
/// was removed) is repaired like one that lacks the blob; `bulkDelete` reports
/// the failures of every replica; `bulkUpdateBlobs` answers one status per
/// blob in request order; the missing-blob answer keeps request order and
/// the size as part of the identity; `skipsWrite` holds only when every
/// replica has the blob, so that a rewrite fills a replica that lost it.
public final class ReplicatedStorage: Storage {
    public let replicas: [any Storage]
    public let readReplication: Bool
    /// Background replication of blobs found in only some replicas; 0: off.
    public let replicationQueueSize: Int
    /// Queue capacity for read-repair when background replication is off.
    public static let readRepairQueueCapacity = 1024

    private let queue: ReplicationQueue?
    /// Blobs read lately whose replicas were checked in the background.
    private let recentlyChecked = RecentSet<Digest>(capacity: 4096)
    private let counters: Counters

    struct Counters: Sendable {
        let repairs, repairFailures, errors: MetricCounter
        init(_ m: MetricScope) {
            repairs = m.counter(MetricCatalog.replicaRepairs)
            repairFailures = m.counter(MetricCatalog.replicaRepairFailures)
            errors = m.counter(MetricCatalog.replicaErrors)
        }
    }

    public init(replicas: [any Storage], readReplication: Bool, replicationQueueSize: Int, replicationThreads: Int,
                metrics: MetricScope = .standalone("storage")) throws {
        guard replicas.count >= 2 else { throw StorageError.unsupported("a replicated storage needs at least two storages") }
        self.replicas = replicas
        self.readReplication = readReplication
        self.replicationQueueSize = max(0, replicationQueueSize)
        counters = Counters(metrics)
        if readReplication || replicationQueueSize > 0 {
            let capacity = replicationQueueSize > 0 ? replicationQueueSize : ReplicatedStorage.readRepairQueueCapacity
            let box = WeakBox<ReplicatedStorage>()
            queue = ReplicationQueue(capacity: capacity, threads: replicationThreads, metrics: metrics) { d in
                box.value?.replicate(d)
            }
            box.value = self
        } else {
            queue = nil
        }
    }

    public func start() throws {
        try ChildStorages.start(replicas)
        queue?.start()
    }

    public func stop() throws {
        queue?.stop()
        try ChildStorages.stop(replicas)
    }

    /// Blobs queued for, or being copied by, background replication.
    public var pendingReplications: Int { queue?.pending ?? 0 }

    // MARK: reads

    public func hasBlob(_ d: Digest) throws -> Bool {
        var failure: Error?
        for (i, r) in replicas.enumerated() {
            do {
                if try r.hasBlob(d) { return true }
            } catch {
                failed(i, "checking \(d)", error)
                failure = failure ?? error
            }
        }
        if let failure { throw failure }
        return false
    }

    public func getBlob(_ d: Digest) throws -> BlobSource? {
        var missing: [Int] = []
        var failure: Error?
        for (i, r) in replicas.enumerated() {
            let found: BlobSource?
            do { found = try r.getBlob(d) } catch {
                failed(i, "reading \(d)", error)
                failure = failure ?? error
                if removedAsCorrupt(error) { missing.append(i) }
                continue
            }
            guard let src = found else {
                missing.append(i)
                continue
            }
            if readReplication {
                for j in (i + 1)..<replicas.count {
                    do {
                        if try !replicas[j].hasBlob(d) { missing.append(j) }
                    } catch { failed(j, "checking \(d)", error) }
                }
                copy(d, from: src, to: missing)
            }
            return src
        }
        if let failure { throw failure }
        return nil
    }

    public func openBlob(_ d: Digest) throws -> BlobSource? {
        try firstAnswer(d, "opening") { try $0.openBlob(d) }
    }

    public func read(_ d: Digest, offset: Int64, length: Int) throws -> Data? {
        try firstAnswer(d, "reading") { try $0.read(d, offset: offset, length: length) }
    }

    /// The first replica's non-nil answer. With read replication, the
    /// replicas are checked and repaired in the background: at once when one
    /// tried first lacked the blob, else on the first read of the blob for a
    /// while (the later replicas were not asked).
    private func firstAnswer<T>(_ d: Digest, _ what: String, _ call: (any Storage) throws -> T?) throws -> T? {
        var lacking = false
        var failure: Error?
        for (i, r) in replicas.enumerated() {
            let answer: T?
            do { answer = try call(r) } catch {
                failed(i, "\(what) \(d)", error)
                failure = failure ?? error
                if removedAsCorrupt(error) { lacking = true }
                continue
            }
            guard let answer else {
                lacking = true
                continue
            }
            if readReplication, lacking || !recentlyChecked.contains(d) {
                recentlyChecked.insert(d)
                queue?.submit(d)
            }
            return answer
        }
        if let failure { throw failure }
        return nil
    }

    /// Missing from every replica that answered, in request order.
    public func missingBlobs(_ ds: [Digest]) throws -> [Digest] {
        guard !ds.isEmpty else { return [] }
        var answered = 0
        var missingFrom: [Digest: Int] = [:]
        var failure: Error?
        for (i, r) in replicas.enumerated() {
            do {
                for d in Set(try r.missingBlobs(ds)) { missingFrom[d, default: 0] += 1 }
                answered += 1
            } catch {
                failed(i, "finding missing blobs", error)
                failure = failure ?? error
            }
        }
        if answered == 0, let failure { throw failure }
        if replicationQueueSize > 0 {
            for (d, n) in missingFrom where n < answered { queue?.submit(d) }
        }
        return ds.filter { missingFrom[$0] == answered }
    }

    /// Each replica in order gives what it has of what is still wanted; with
    /// read replication, each replica then receives the blobs it lacked.
    public func bulkReadBlobs(_ ds: [Digest]) throws -> [Digest: Data] {
        var seen: Set<Digest> = []
        let wanted = ds.filter { seen.insert($0).inserted }
        guard !wanted.isEmpty else { return [:] }
        var found: [Digest: Data] = [:]
        var lacking = [[Digest]](repeating: [], count: replicas.count)
        var answered = 0
        var failure: Error?
        for (i, r) in replicas.enumerated() {
            do {
                let missing = Set(try r.missingBlobs(wanted))
                let ask = wanted.filter { !missing.contains($0) && found[$0] == nil }
                let got = ask.isEmpty ? [:] : try r.bulkReadBlobs(ask)
                answered += 1
                for (d, data) in got where found[d] == nil { found[d] = data }
                lacking[i] = wanted.filter { missing.contains($0) } + ask.filter { got[$0] == nil }
            } catch {
                failed(i, "reading \(wanted.count) blobs", error)
                failure = failure ?? error
            }
        }
        if answered == 0, let failure { throw failure }
        if readReplication {
            for (i, list) in lacking.enumerated() {
                let blobs = list.compactMap { d in found[d].map { (d, $0) } }
                guard !blobs.isEmpty else { continue }
                let statuses = replicas[i].bulkUpdateBlobs(blobs)
                let failures = statuses.compactMap { $0 }.count + max(0, blobs.count - statuses.count)
                counters.repairs.add(blobs.count - failures)
                if failures > 0 {
                    counters.repairFailures.add(failures)
                    log.warning("read-repair of \(failures) of \(blobs.count) blobs into replica \(i) failed")
                }
            }
        }
        return found
    }

    // MARK: writes

    /// Fails only when every replica failed (with the first error).
    public func commitWrite(_ d: Digest, _ source: BlobSource) throws {
        var failures: [Error] = []
        for (i, r) in replicas.enumerated() {
            do { try r.commitWrite(d, source) } catch {
                failed(i, "writing \(d)", error)
                failures.append(error)
            }
        }
        if failures.count == replicas.count { throw failures[0] }
    }

    /// One status per blob, in request order: success if any replica stored
    /// it, else the last replica's error.
    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        var statuses = [StorageError?](repeating: .io(errno: EIO, "no replica answered"), count: blobs.count)
        for r in replicas {
            let answer = r.bulkUpdateBlobs(blobs)
            for i in blobs.indices where statuses[i] != nil {
                statuses[i] = i < answer.count ? answer[i] : .io(errno: EIO, "inconsistent batch results")
            }
        }
        return statuses
    }

    public func skipsWrite(_ d: Digest, _ source: BlobSource) throws -> Bool {
        for (i, r) in replicas.enumerated() {
            do {
                if try !r.skipsWrite(d, source) { return false }
            } catch {
                failed(i, "checking \(d)", error)
                return false
            }
        }
        return true
    }

    public func recordVerified(_ d: Digest, _ source: BlobSource) {
        for r in replicas { r.recordVerified(d, source) }
    }

    // MARK: deletes

    /// Deletes from every replica; then throws the first failure.
    public func deleteBlob(_ d: Digest) throws {
        var failure: Error?
        for (i, r) in replicas.enumerated() {
            do { try r.deleteBlob(d) } catch {
                failed(i, "deleting \(d)", error)
                failure = failure ?? error
            }
        }
        if let failure { throw failure }
    }

    /// The hashes some replica could not delete.
    public func bulkDelete(_ ds: [Digest]) -> [String] {
        var seen: Set<String> = []
        var out: [String] = []
        for r in replicas {
            for h in r.bulkDelete(ds) where seen.insert(h).inserted { out.append(h) }
        }
        return out
    }

    // MARK: hints (to the replica reads try first)

    public func warm(_ ds: [Digest]) { replicas[0].warm(ds) }
    public func prefetch(_ ds: [Digest]) { replicas[0].prefetch(ds) }

    // MARK: repair

    /// Copies `d` from a replica that has it to every replica that lacks it.
    func replicate(_ d: Digest) {
        var have: [Int] = []
        var lack: [Int] = []
        for (i, r) in replicas.enumerated() {
            do {
                if try r.hasBlob(d) { have.append(i) } else { lack.append(i) }
            } catch { failed(i, "checking \(d)", error) }
        }
        guard !lack.isEmpty else { return }
        for i in have {
            do {
                if let src = try replicas[i].getBlob(d) {
                    copy(d, from: src, to: lack)
                    return
                }
            } catch { failed(i, "reading \(d)", error) }
        }
    }

    /// Writes `src` into the replicas `targets` (errors are logged). Only
    /// bytes known to match the digest are copied.
    private func copy(_ d: Digest, from src: BlobSource, to targets: [Int]) {
        guard !targets.isEmpty else { return }
        if !src.isVerified {
            do { try src.verify(d) } catch {
                log.error("not copying \(d) to other replicas: \(error)")
                return
            }
        }
        for t in targets {
            do {
                try replicas[t].commitWrite(d, src)
                counters.repairs.add()
            } catch {
                counters.repairFailures.add()
                log.warning("copying \(d) to replica \(t) failed: \(error)")
            }
        }
    }

    /// A replica's check found bad bytes and removed them: it now lacks the blob.
    private func removedAsCorrupt(_ error: Error) -> Bool {
        if case StorageError.corrupt = error { return true }
        return false
    }

    private func failed(_ replica: Int, _ what: String, _ error: Error) {
        counters.errors.add()
        log.warning("replica \(replica): \(what) failed: \(error)")
    }
}

/// A weak reference that can be handed to a closure made before its target.
final class WeakBox<T: AnyObject & Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private weak var _value: T?
    var value: T? {
        get { lock.withLock { _value } }
        set { lock.withLock { _value = newValue } }
    }
}
