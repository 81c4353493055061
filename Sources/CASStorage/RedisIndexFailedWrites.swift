import CASCore
import Foundation
import Redis
import Synchronization

/// A write's bytes are stored before its key is set, so no key ever names
/// bytes that are not there. When the key cannot be set — Redis refuses
/// the SET (out of memory under `noeviction`, a read-only replica), the
/// connection is lost, or the call times out and whether the SET landed is
/// unknown — Redis is asked again whether the key is there:
/// - present: the blob is indexed (another writer indexed it meanwhile, or
///   this write's SET landed before the error), so the write succeeds. If it
///   was this write's SET, its INCRBY of the total never ran: the total is
///   short by the blob's size until `casfs reindex` recomputes it.
/// - absent: the copy this write put in place is taken out of the store
///   again (only that very copy: one another writer stored meanwhile is
///   never touched), after a short grace during which a writer that found
///   this copy and skipped its own may index it (the copy is then kept).
///   The write fails; the store and the index agree.
/// - no answer: removing the copy could delete bytes another writer has
///   indexed meanwhile, so it stays; it is remembered and settled the same
///   way as soon as Redis answers (`casfs reindex` indexes what a crash left).
///   The write fails.
/// A SET whose connection broke or timed out may have run, or may still run
/// (Redis reads what was sent before it sees the connection close): its
/// copy is not judged at once but remembered and settled a second after
/// Redis answers again, by which time such a SET has run or never will.
extension RedisIndex {
    /// Copies of failed writes waiting for Redis to tell whether they are indexed.
    public var unsettledCopies: Int { unsettled.count }

    /// How long a taken-back copy waits before it is discarded.
    static let settleGrace: useconds_t = 100_000

    /// Decides what becomes of copies whose index write failed with
    /// `error` (`created`: the copy each write put in place, nil when a copy
    /// was there before it, which is never removed). Returns, per item,
    /// whether the blob is indexed after all.
    func settleFailedIndexWrite(_ items: [(digest: Digest, created: FileStamp?)], _ error: Error) -> [Bool] {
        let digests = items.map(\.digest)
        let present: [Bool]
        do {
            present = try runPerKey(digests, "EXISTS").map { ((try? $0.integerValue()) ?? 0) > 0 }
        } catch {
            for item in items where item.created != nil { unsettled.add(item.digest, item.created!, settle: settleRemembered) }
            indexLog.error("index write of \(items.count) blob(s) failed (\(error)) and Redis does not answer: the bytes stored stay until Redis can tell whether another writer indexed them")
            return items.map { _ in false }
        }
        var indexed: [Bool] = []
        for (item, here) in zip(items, present) {
            if here {
                indexLog.warning("index write of \(item.digest) failed (\(error)), but the index has it (indexed by another writer, or the write landed before the error): stored")
                indexed.append(true)
                continue
            }
            indexed.append(false)
            guard let copy = item.created else {
                indexLog.error("index write of \(item.digest) failed (\(error)); nothing stored (its bytes were in the store before this write and stay)")
                continue
            }
            switch takeBack(item.digest, copy) {
            case .removed:
                indexLog.error("index write of \(item.digest) failed (\(error)); its bytes were taken out of the store again: nothing stored")
            case .keptForAnotherWriter:
                indexLog.warning("index write of \(item.digest) failed (\(error)); another writer indexed the same blob meanwhile: its bytes stay")
            case .unknown:
                indexLog.error("index write of \(item.digest) failed (\(error)) and Redis stopped answering: its bytes stay until it does")
            }
        }
        return indexed
    }

    enum TakeBack { case removed, keptForAnotherWriter, unknown }

    /// Takes `copy` of `d` back out of the store unless it is indexed by
    /// then. Copies replaced meanwhile are another writer's and stay.
    func takeBack(_ d: Digest, _ copy: FileStamp) -> TakeBack {
        guard let tracking = storage as? CopyTracking else { return .keptForAnotherWriter }
        let withdrawn: WithdrawnBlob
        do {
            guard let w = try tracking.withdraw(d, ifStill: copy) else { return .keptForAnotherWriter }
            withdrawn = w
        } catch {
            unsettled.add(d, copy, settle: settleRemembered)
            return .unknown
        }
        usleep(RedisIndex.settleGrace)
        let indexed: Bool
        do { indexed = try hasBlob(d) } catch {
            // Cannot tell: put it back, and look again once Redis answers.
            _ = tracking.restore(withdrawn)
            unsettled.add(d, copy, settle: settleRemembered)
            return .unknown
        }
        if indexed {
            if !tracking.restore(withdrawn) { indexLog.error("could not put back \(d), which another writer indexed meanwhile") }
            return .keptForAnotherWriter
        }
        tracking.discard(withdrawn)
        return .removed
    }

    /// Remembers the copies of writes whose index write may or may not have
    /// run; they are settled once Redis answers again.
    func settleLater(_ items: [(digest: Digest, created: FileStamp?)], _ error: Error) {
        var kept = 0
        for item in items {
            guard let copy = item.created else { continue }
            unsettled.add(item.digest, copy, settle: settleRemembered)
            kept += 1
        }
        indexLog.error("index write of \(items.count) blob(s) failed (\(error)) and may still land: nothing stored for now; \(kept) copies stay until Redis answers and tells")
    }

    /// Settles remembered copies once Redis answers; false while it does not.
    func settleRemembered(_ pending: [Digest: FileStamp]) -> Bool {
        let items = pending.map { (digest: $0.key, created: Optional($0.value)) }
        guard (try? run(["PING"])) != nil else { return false }
        // A SET of a connection that broke runs now or never.
        Thread.sleep(forTimeInterval: 1)
        for item in items {
            let present: Bool
            do { present = try hasBlob(item.digest) } catch { return false }
            if !present, let copy = item.created, takeBack(item.digest, copy) == .unknown { return false }
            unsettled.remove(item.digest)
        }
        indexLog.notice("settled \(items.count) blob(s) whose index write had failed while Redis did not answer")
        return true
    }
}

/// Copies whose index write failed while Redis did not answer, settled by
/// a background task that tries again with back-off (1 s doubling to 30 s).
/// At most `capacity` are remembered; beyond, `casfs reindex` indexes them.
final class UnsettledCopies: Sendable {
    static let capacity = 10_000
    private let state = Mutex<(copies: [Digest: FileStamp], running: Bool)>(([:], false))

    var count: Int { state.withLock { $0.copies.count } }

    func add(_ d: Digest, _ copy: FileStamp, settle: @escaping @Sendable ([Digest: FileStamp]) -> Bool) {
        let start = state.withLock { s -> Bool in
            if s.copies.count < UnsettledCopies.capacity { s.copies[d] = copy }
            defer { s.running = true }
            return !s.running
        }
        guard start else { return }
        DispatchQueue.global(qos: .utility).async { [self] in
            var delay = 1.0
            while true {
                Thread.sleep(forTimeInterval: delay)
                let pending = state.withLock { $0.copies }
                if pending.isEmpty || settle(pending) {
                    let done = state.withLock { s -> Bool in
                        if s.copies.isEmpty { s.running = false }
                        return !s.running
                    }
                    if done { return }
                    delay = 1
                } else {
                    delay = min(30, delay * 2)
                }
            }
        }
    }

    func remove(_ d: Digest) { state.withLock { _ = $0.copies.removeValue(forKey: d) } }
}
