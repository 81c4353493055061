import CASCore
import Foundation
import Redis

extension RedisIndex {
    /// Indexes digests whose bytes the storage already holds (SET NX EX, then
    /// one INCRBY for those that were new), in one streamed pipeline (see
    /// `RedisPool.pipeline(count:encode:)`). Returns how many were new. Used
    /// to rebuild a lost index from a disk store.
    public func addToIndex(_ digests: [Digest]) throws -> Int {
        let digests = digests.filter { !$0.isEmpty }
        if digests.isEmpty { return 0 }
        // `*6 $3 SET`, then the key, then `$1 1 $2 EX $<n> <ttl> $2 NX`: the
        // constant parts are encoded once, each command is a few appends.
        var head = RedisCommands()
        head.begin(argumentCount: 6)
        head.argument("SET")
        let headBytes = head.bytes
        let ttl = Array(String(RedisIndex.ttlSeconds).utf8)
        var tailBytes: [UInt8] = []
        for part in [Array("1".utf8), Array("EX".utf8), ttl, Array("NX".utf8)] {
            tailBytes.append(UInt8(ascii: "$"))
            RedisCommands.appendDecimal(Int64(part.count), to: &tailBytes)
            tailBytes += [13, 10]
            tailBytes += part
            tailBytes += [13, 10]
        }
        let keyHead = Array((prefix + ":").utf8)
        let replies = try digests.withUnsafeBufferPointer { ds in
            try redis.pipeline(count: ds.count) { batch, i in
                batch.appendCommand { bytes in
                    let d = ds[i]
                    bytes.append(contentsOf: headBytes)
                    bytes.append(UInt8(ascii: "$"))
                    let keyLength = keyHead.count + d.hash.utf8.count + 1 + RedisCommands.decimalLength(d.size)
                    RedisCommands.appendDecimal(Int64(keyLength), to: &bytes)
                    bytes.append(13); bytes.append(10)
                    bytes.append(contentsOf: keyHead)
                    bytes.append(contentsOf: d.hash.utf8)
                    bytes.append(UInt8(ascii: "_"))
                    RedisCommands.appendDecimal(d.size, to: &bytes)
                    bytes.append(13); bytes.append(10)
                    bytes.append(contentsOf: tailBytes)
                }
            }
        }
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
