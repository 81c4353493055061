import CASCore
import Foundation
import Synchronization
import TestSupport
import XCTest

/// 8 writers and 8 readers through a mount with a 128 MiB memory cache: the
/// daemon's peak RSS stays within its RSS when mounted, plus the cache, plus
/// a bounded overhead (48 MiB here; the measured overhead is about 15 MiB,
/// see bench/mount-load-rss). Before the cache counted blobs being read in
/// and evicted blobs still being read, the peak was 2.5 times the cache.
final class MemoryBoundTests: MountTestCase {
    func testPeakRSSUnderEightWritersAndEightReaders() throws {
        let r = try startRedis()
        let config = """
            storage: !with-cache-storage
              cache: !lru-storage
                size: 128M
              fallback: !redis-index
                redis: !redis-connection
                  host: 127.0.0.1
                  port: \(r.port)
                storage: !disk-storage
                  path: \(storeDir)
            mount:
              writable: true

            """
        let sizes = [64 << 10, 1 << 20, 4 << 20, 16 << 20, 256 << 10, 32 << 20, 2 << 20, 8 << 20]
        let blobs = try (0..<64).map { try localBlob(randomData(sizes[$0 % sizes.count], seed: 2000 + UInt64($0))) }
        let m = try mount(config)
        let idle = try XCTUnwrap(m.peakRSSKiB())
        let writers = (0..<8).map { w in blobs.enumerated().filter { $0.offset % 8 == w }.map(\.element) }
        let written = tmp + "/written"
        FileManager.default.createFile(atPath: written, contents: nil)
        let group = DispatchGroup()
        for list in writers {
            let script = list.map { "cp \(shq($0.path)) \(shq(m.path($0.digest))) && echo \($0.digest) >> \(shq(written))" }.joined(separator: "\n")
            group.enter()
            DispatchQueue.global().async {
                runShell(script)
                group.leave()
            }
        }
        let reader = """
            for i in $(seq 20); do
              n=$(shuf -n 1 \(shq(written)) 2>/dev/null); [ -z "$n" ] && { sleep 0.05; continue; }
              dd if=\(shq(m.sha256))/$n iflag=nocache count=0 status=none
              cat \(shq(m.sha256))/$n > /dev/null || echo "read of $n failed" >&2
            done
            """
        let failures = Mutex<[String]>([])
        for _ in 0..<8 {
            group.enter()
            DispatchQueue.global().async {
                let out = runShell(reader)
                if !out.stderr.isEmpty { failures.withLock { $0.append(out.stderr) } }
                group.leave()
            }
        }
        group.wait()
        XCTAssertEqual(failures.withLock { $0 }, [], "reads failed under load")
        for b in blobs.prefix(8) { XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(b.digest))) | cut -c1-64"), b.digest.hash + "\n") }
        let peak = try XCTUnwrap(m.peakRSSKiB())
        print("daemon RSS: \(idle >> 10) MiB mounted, \(peak >> 10) MiB at the peak of the load (memory cache 128 MiB)")
        XCTAssertLessThanOrEqual(peak, idle + (128 << 10) + (48 << 10),
                                 "peak RSS \(peak >> 10) MiB: more than \(idle >> 10) MiB mounted + 128 MiB cache + 48 MiB")
    }
}
