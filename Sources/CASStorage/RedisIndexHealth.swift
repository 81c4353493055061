import CASCore
import Foundation
import Redis

/// What a look at an index and its store found: the signs that the index
/// lost entries (Redis restarted empty, keys evicted) or will lose them.
public struct IndexHealth: Sendable, Equatable {
    /// The Redis's `maxmemory-policy`; nil when it could not be read.
    public var evictionPolicy: String?
    /// The policy evicts keys (anything but `noeviction`): index entries
    /// can vanish while their blobs stay.
    public var evicts: Bool { evictionPolicy.map { $0 != "noeviction" } ?? false }
    /// `total_size` is missing although the store holds blobs.
    public var totalSizeMissing: Bool
    /// Blobs of the store looked at, and how many of them the index lacks.
    public var sampled: Int
    public var missing: Int

    public init(evictionPolicy: String?, totalSizeMissing: Bool, sampled: Int, missing: Int) {
        self.evictionPolicy = evictionPolicy
        self.totalSizeMissing = totalSizeMissing
        self.sampled = sampled
        self.missing = missing
    }

    /// The index lacks more than half of the store blobs looked at.
    public var emptierThanStore: Bool { missing > 0 && missing * 2 > sampled }

    /// Entries were lost: a reindex brings them back.
    public var lost: Bool { emptierThanStore || totalSizeMissing }

    public var healthy: Bool { !lost && !evicts }

    /// One line per problem, for logs and `casfs stat`.
    public var problems: [String] {
        var out: [String] = []
        if emptierThanStore {
            out.append("the index is much emptier than its store: \(missing) of \(sampled) blobs sampled from the store have no index entry (Redis lost its data, or evicted keys)")
        }
        if totalSizeMissing {
            out.append("the index has no total_size counter although the store holds blobs")
        }
        if evicts, let policy = evictionPolicy {
            out.append("the index's Redis has maxmemory-policy \(policy): it evicts keys when full, and an evicted key is a blob the index forgets (set maxmemory-policy noeviction)")
        }
        return out
    }
}

extension RedisIndex {
    /// The Redis's `maxmemory-policy`: CONFIG GET, else (a managed Redis
    /// may refuse CONFIG) the `maxmemory_policy` line of INFO memory; nil
    /// if neither answers.
    public func evictionPolicy() -> String? {
        if let r = try? run(["CONFIG", "GET", "maxmemory-policy"]), case .array(let items) = r, items.count >= 2,
           let v = items[1].string {
            return v
        }
        if let r = try? run(["INFO", "memory"]), let text = r.string {
            for line in text.split(whereSeparator: \.isNewline) where line.hasPrefix("maxmemory_policy:") {
                return String(line.dropFirst("maxmemory_policy:".count))
            }
        }
        return nil
    }

    /// Whether `total_size` exists.
    public func hasTotalSize() throws -> Bool {
        try run(["EXISTS", .string(totalSizeKey)]).integerValue() > 0
    }

    /// Looks at the index and (when it can sample it) its store: the
    /// eviction policy, `total_size`, and whether the index has entries for
    /// `sample` blobs picked at random from the store. A few commands and a
    /// directory or two read: cheap enough to repeat every few seconds.
    public func checkHealth(sample: Int = 64) throws -> IndexHealth {
        let policy = evictionPolicy()
        var sampled = 0
        var missing = 0
        var storeHasBlobs = false
        if let store = storage as? BlobSampling {
            let blobs = store.sampleBlobs(sample, settled: 5)
            sampled = blobs.count
            storeHasBlobs = !blobs.isEmpty
            if !blobs.isEmpty {
                let exists = try runPerKey(blobs, "EXISTS")
                missing = exists.filter { ((try? $0.integerValue()) ?? 0) == 0 }.count
            }
        }
        let totalMissing = storeHasBlobs ? !(try hasTotalSize()) : false
        return IndexHealth(evictionPolicy: policy, totalSizeMissing: totalMissing, sampled: sampled, missing: missing)
    }
}
