import CASCore
import Foundation
import Redis

/// What `RedisIndex.reconcile` found (and, unless a dry run, fixed).
public struct ReconcileReport: Sendable, Equatable {
    /// Blobs in the store the index lacked.
    public var added = 0
    public var addedBytes: Int64 = 0
    /// Index entries whose bytes were gone.
    public var dropped = 0
    public var droppedBytes: Int64 = 0
    /// `total_size` before, and the sum of the indexed sizes it was set to
    /// (nil when it could not be settled because writers kept changing it).
    public var totalBefore: Int64 = 0
    public var totalAfter: Int64?
    public var blobs: Int64 = 0

    public init(added: Int = 0, addedBytes: Int64 = 0, dropped: Int = 0, droppedBytes: Int64 = 0,
                totalBefore: Int64 = 0, totalAfter: Int64? = nil, blobs: Int64 = 0) {
        self.added = added
        self.addedBytes = addedBytes
        self.dropped = dropped
        self.droppedBytes = droppedBytes
        self.totalBefore = totalBefore
        self.totalAfter = totalAfter
        self.blobs = blobs
    }
}

extension RedisIndex {
    /// Makes index and store agree, both ways: adds blobs the store holds
    /// that the index lacks (when the store can list them), drops entries
    /// whose bytes are gone, and recomputes `total_size`. Safe beside live
    /// mounts and a BuildGrid sharing the store: entries are only added with
    /// SET NX, an entry is dropped only after its bytes were seen missing and
    /// re-added if they appear meanwhile, and the total is replaced only if no
    /// writer changed it while it was summed.
    public func reconcile(dryRun: Bool = false, progress: ((String) -> Void)? = nil) throws -> ReconcileReport {
        var report = ReconcileReport()
        report.totalBefore = try totalSize()

        if let store = storage as? BlobEnumerating {
            var batch: [Digest] = []
            func flush() throws {
                defer { batch.removeAll(keepingCapacity: true) }
                let exists = try runPerKey(batch, "EXISTS")
                let absent = zip(batch, exists).filter { ((try? $0.1.integerValue()) ?? 0) == 0 }.map(\.0)
                guard !absent.isEmpty else { return }
                if dryRun {
                    report.added += absent.count
                    report.addedBytes = report.addedBytes.saturatingAdd(absent.map(\.size).saturatingSum())
                } else {
                    let n = try addToIndex(absent)
                    // A blob listed, then deleted (cleanup, an unlink, a scrub)
                    // before its key was added: take the key back out, unless
                    // a write stored the blob again meanwhile.
                    var gone: [Digest] = []
                    let missing = try storage.missingBlobs(absent)
                    if !missing.isEmpty {
                        let removed = try deleteFromIndex(missing)
                        let still = Set(try storage.missingBlobs(removed))
                        let reappeared = removed.filter { !still.contains($0) }
                        if !reappeared.isEmpty { try addToIndex(reappeared) }
                        gone = removed.filter { still.contains($0) }
                    }
                    let goneSet = Set(gone)
                    report.added += max(0, n - gone.count)
                    report.addedBytes = report.addedBytes.saturatingAdd(absent.filter { !goneSet.contains($0) }.map(\.size).saturatingSum())
                }
            }
            try store.forEachBlob { d in
                batch.append(d)
                if batch.count == 1000 { try flush() }
            }
            if !batch.isEmpty { try flush() }
            progress?("store walked: \(report.added) blobs were missing from the index")
        }

        var cursor: UInt64 = 0
        repeat {
            let (next, keys) = try scanPage(cursor: cursor, count: RedisIndex.scanCount)
            cursor = next
            let page = keys.compactMap { digest(fromKey: $0) }
            guard !page.isEmpty else { continue }
            let gone = try storage.missingBlobs(page)
            guard !gone.isEmpty else { continue }
            if dryRun {
                report.dropped += gone.count
                report.droppedBytes = report.droppedBytes.saturatingAdd(gone.map(\.size).saturatingSum())
                continue
            }
            let removed = try deleteFromIndex(gone)
            // A write may have stored and indexed one meanwhile: put it back.
            let back = Set(try storage.missingBlobs(removed))
            let reappeared = removed.filter { !back.contains($0) }
            if !reappeared.isEmpty { try addToIndex(reappeared) }
            let dropped = removed.filter { back.contains($0) }
            report.dropped += dropped.count
            report.droppedBytes = report.droppedBytes.saturatingAdd(dropped.map(\.size).saturatingSum())
            counters.orphans.add(dropped.count)
        } while cursor != 0
        progress?("index walked: \(report.dropped) entries had no bytes")

        if !dryRun {
            report.totalAfter = try settleTotal(&report.blobs)
        } else {
            var sum: Int64 = 0
            report.blobs = try sumIndexed(&sum)
            report.totalAfter = sum
        }
        return report
    }

    /// Counts the indexed blobs and sums their sizes.
    private func sumIndexed(_ sum: inout Int64) throws -> Int64 {
        var cursor: UInt64 = 0
        var count: Int64 = 0
        sum = 0
        repeat {
            let (next, keys) = try scanPage(cursor: cursor, count: 10_000)
            cursor = next
            for k in keys {
                guard let d = digest(fromKey: k) else { continue }
                sum = sum.saturatingAdd(d.size)
                count += 1
            }
        } while cursor != 0
        return count
    }

    /// Sets `total_size` to the sum of the indexed sizes, unless it changed
    /// while they were summed (then tries again, a few times).
    private func settleTotal(_ blobs: inout Int64) throws -> Int64? {
        for _ in 0..<5 {
            let before = try run(["GET", .string(totalSizeKey)])
            var sum: Int64 = 0
            blobs = try sumIndexed(&sum)
            let expected: RedisArgument = before.isNull ? "" : .bytes(before.bytes ?? [])
            let r = try run(["EVAL", .string(RedisIndex.compareAndSetScript), 1, .string(totalSizeKey), expected, .integer(sum)])
            if (try? r.integerValue()) == 1 { return sum }
        }
        indexLog.warning("total_size kept changing while it was recomputed; left as it is")
        return nil
    }

    /// SET KEYS[1] to ARGV[2] if its value is still ARGV[1] ("" for absent).
    static let compareAndSetScript = """
        local v = redis.call('GET', KEYS[1])
        if (v == false and ARGV[1] == '') or v == ARGV[1] then
          redis.call('SET', KEYS[1], ARGV[2])
          return 1
        end
        return 0
        """
}
