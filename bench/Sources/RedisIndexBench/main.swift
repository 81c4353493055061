// casfs's RedisIndex against BuildGrid's RedisIndex on the same Redis, run by
// bench/redis-index. Both indexes sit over an in-memory storage, so what is
// compared is the index: missing_blobs over 10,000 digests (half present) and
// bulk_update_blobs of 1,000 fresh 100-byte blobs. Runs alternate between the
// two; medians and ratios (BuildGrid time / casfs time) are printed. Before
// the timed calls each side makes one untimed call of each operation (on the
// same digests for missing_blobs, on another fresh batch for bulk_update_blobs).

import CASCore
import CASStorage
import Foundation
import Redis

struct Options {
    var host = "127.0.0.1"
    var port = 6379
    var python = ""
    var helper = ""
    var runs = 7
    var present = 5000
    var absent = 5000
    var batch = 1000
    var blobSize = 100
}

func parseOptions() -> Options {
    var o = Options()
    var args = CommandLine.arguments.dropFirst().makeIterator()
    while let a = args.next() {
        guard let v = args.next() else { fatalError("missing value for \(a)") }
        switch a {
        case "--host": o.host = v
        case "--port": o.port = Int(v)!
        case "--python": o.python = v
        case "--helper": o.helper = v
        case "--runs": o.runs = Int(v)!
        default: fatalError("unknown option \(a)")
        }
    }
    return o
}

struct Rng: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

func blobs(_ rng: inout Rng, _ count: Int, _ size: Int) -> [(Digest, Data)] {
    (0..<count).map { _ in
        var bytes = [UInt8]()
        bytes.reserveCapacity(size + 8)
        while bytes.count < size {
            var r = rng.next()
            withUnsafeBytes(of: &r) { bytes.append(contentsOf: $0) }
        }
        let data = Data(bytes.prefix(size))
        return (Digest.of(data), data)
    }
}

func seconds(_ body: () throws -> Void) rethrows -> Double {
    let t0 = DispatchTime.now().uptimeNanoseconds
    try body()
    return Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// The BuildGrid side: a long-lived Python process answering "run <seed>" with a JSON line.
final class BuildGridSide {
    let process = Process()
    let input = Pipe()
    let output = Pipe()
    var buffer = Data()

    init(_ o: Options) throws {
        process.executableURL = URL(fileURLWithPath: o.python)
        process.arguments = [o.helper, "--host", o.host, "--port", String(o.port)]
        process.standardInput = input
        process.standardOutput = output
        try process.run()
    }

    func run(seed: Int) throws -> [String: Double] {
        input.fileHandleForWriting.write(Data("run \(seed)\n".utf8))
        while true {
            if let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = buffer[buffer.startIndex..<nl]
                buffer = Data(buffer[(nl + 1)...])
                guard let obj = try JSONSerialization.jsonObject(with: line) as? [String: Double] else {
                    throw CocoaError(.coderReadCorrupt)
                }
                return obj
            }
            let chunk = output.fileHandleForReading.availableData
            if chunk.isEmpty { throw CocoaError(.fileReadUnknown, userInfo: [NSLocalizedDescriptionKey: "BuildGrid helper exited"]) }
            buffer.append(chunk)
        }
    }

    func stop() {
        input.fileHandleForWriting.write(Data("quit\n".utf8))
        process.waitUntilExit()
    }
}

func main() throws {
    let o = parseOptions()
    let redis = RedisPool(RedisConfig(host: o.host, port: o.port))
    let index = try RedisIndex(redis: redis, storage: MemoryStorage(maxBytes: 1 << 30))
    let buildgrid = try BuildGridSide(o)
    var mine: [String: [Double]] = [:]
    var theirs: [String: [Double]] = [:]

    for run in 0..<o.runs {
        // casfs
        var rng = Rng(state: UInt64(run) &* 7919 &+ 12345)
        _ = try redis.command("FLUSHDB").checked()
        let present = blobs(&rng, o.present, o.blobSize)
        precondition(index.bulkUpdateBlobs(present).allSatisfy { $0 == nil })
        let absent = blobs(&rng, o.absent, o.blobSize).map(\.0)
        var asked = present.map(\.0) + absent
        asked.shuffle(using: &rng)
        let warm = blobs(&rng, o.batch, o.blobSize)
        let fresh = blobs(&rng, o.batch, o.blobSize)
        // Untimed warm-up, the same on both sides: one call of each operation.
        let warmMissing = try index.missingBlobs(asked)
        precondition(warmMissing.count == absent.count)
        precondition(index.bulkUpdateBlobs(warm).allSatisfy { $0 == nil })
        var missing: [Digest] = []
        var statuses: [StorageError?] = []
        let tMissing = try seconds { missing = try index.missingBlobs(asked) }
        let tUpdate = seconds { statuses = index.bulkUpdateBlobs(fresh) }
        precondition(missing.count == absent.count, "unexpected missing count \(missing.count)")
        precondition(statuses.allSatisfy { $0 == nil }, "bulk update failed: \(statuses.compactMap { $0 }.prefix(3))")
        mine["missing_blobs", default: []].append(tMissing)
        mine["bulk_update_blobs", default: []].append(tUpdate)

        // BuildGrid
        let r = try buildgrid.run(seed: run)
        for (k, v) in r { theirs[k, default: []].append(v) }
        print(String(format: "run %d: casfs missing_blobs %.2f ms, bulk_update_blobs %.2f ms; buildgrid %.2f ms, %.2f ms",
                     run + 1, tMissing * 1e3, tUpdate * 1e3, (r["missing_blobs"] ?? 0) * 1e3, (r["bulk_update_blobs"] ?? 0) * 1e3))
    }
    buildgrid.stop()
    _ = try redis.command("FLUSHDB")

    for op in ["missing_blobs", "bulk_update_blobs"] {
        let m = median(mine[op] ?? []), t = median(theirs[op] ?? [])
        print(String(format: "%@ median: casfs %.2f ms, buildgrid %.2f ms", op, m * 1e3, t * 1e3))
        print(String(format: "%@ ratio: %.2f", op, t / m))
    }
}

do {
    try main()
} catch {
    FileHandle.standardError.write(Data("casfs-bench-redis: \(error)\n".utf8))
    exit(1)
}
