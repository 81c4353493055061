import CASCore
import Foundation
import Redis

extension RedisIndex {
    /// Indexes digests whose bytes the storage already holds (SET NX EX, then
    /// one INCRBY for those that were new), in one pipeline. Returns how many
    /// were new. Used to rebuild a lost index from a disk store.
    public func addToIndex(_ digests: [Digest]) throws -> Int {
        let digests = digests.filter { !$0.isEmpty }
        if digests.isEmpty { return 0 }
        let ttl = RedisArgument.string(String(RedisIndex.ttlSeconds))
        let replies = try redis.pipeline(digests.map { ["SET", .string(key($0)), "1", "EX", ttl, "NX"] })
        var added: Int64 = 0
        var count = 0
        for (d, r) in zip(digests, replies) {
            _ = try r.checked()
            if !r.isNull {
                added += d.size
                count += 1
            }
        }
        if count > 0 { _ = try redis.command(["INCRBY", .string(totalSizeKey), .integer(added)]).checked() }
        return count
    }
}
