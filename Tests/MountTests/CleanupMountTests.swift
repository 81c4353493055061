import CASCore
import CASStorage
import Foundation
import TestSupport
import XCTest

/// `casfs cleanup` beside live writers and readers, on real mounts.
final class CleanupMountTests: MountTestCase {
    var casfs: String { (try? casfsBinary()) ?? "casfs" }

    /// Writes the mount's config to a file for the commands.
    func configFile(_ config: String, name: String = "cmd.yaml") throws -> String {
        let p = tmp + "/" + name
        try config.write(toFile: p, atomically: true, encoding: .utf8)
        return p
    }

    /// `count` small blobs as files named by their digests, in a new directory.
    func blobFiles(_ count: Int, seed: UInt64, sizes: ClosedRange<Int> = 1_000...20_000) throws -> (dir: String, digests: [Digest]) {
        let dir = tmp + "/blobs-\(seed)"
        var g = SplitMix(seed)
        var digests: [Digest] = []
        for i in 0..<count {
            let n = Int.random(in: sizes, using: &g)
            let data = randomData(n, seed: seed &* 1000 &+ UInt64(i))
            let (_, d) = try writeLocalBlob(data, in: dir, name: Digest.of(data).description)
            digests.append(d)
        }
        return (dir, digests)
    }

    /// The digests of every key of the default prefix.
    func indexedDigests(_ r: TestRedis) -> [Digest] {
        r.cli("--scan --pattern 'A:*'").split(separator: "\n").compactMap { Digest(parsing: $0.dropFirst(2)) }
    }

    /// Indexed blobs whose store file is missing or of another length.
    func indexedWithoutBytes(_ r: TestRedis) -> [Digest] {
        indexedDigests(r).filter { d in
            var st = stat()
            return stat(diskObjectPath(root: storeDir, d), &st) != 0 || Int64(st.st_size) != d.size
        }
    }

    func totalSize(_ r: TestRedis) -> Int64 {
        Int64(r.cli("GET total_size").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }

    /// Six writers rewrite 300 blobs (four with cp through a mount, two with
    /// `casfs put`) while `casfs cleanup` evicts in a loop for a minute:
    /// afterwards every indexed blob has its bytes, the total is right, and
    /// every blob written once more is there.
    func testCleanupRacingWritersNeverLeavesAnIndexEntryWithoutBytes() throws {
        let r = try startRedis()
        let config = try indexedDiskConfig()
        let cfg = try configFile(config)
        let m = try mount(config)
        let (dir, digests) = try blobFiles(300, seed: 1)
        let names = digests.map(\.description)
        let log = tmp + "/race.log"
        let evictions = tmp + "/cleanup.out"
        let script = """
            end=$((SECONDS + 60))
            names=(\(names.joined(separator: " ")))
            cpWriter() {
              err=$(mktemp)
              while [ $SECONDS -lt $end ]; do
                for n in $(printf '%s\\n' "${names[@]}" | shuf); do
                  # Two cp's of one new name race as on any filesystem: the later
                  # O_EXCL open is EEXIST once the other's blob is there.
                  if ! cp \(shq(dir))/$n \(shq(m.sha256))/$n 2>"$err"; then
                    grep -q 'File exists' "$err" && [ -e \(shq(m.sha256))/$n ] || { cat "$err" >> \(shq(log)); echo "cp failed: $n" >> \(shq(log)); }
                  fi
                  [ $SECONDS -lt $end ] || break
                done
              done
            }
            putWriter() {
              while [ $SECONDS -lt $end ]; do
                for chunk in $(seq 0 29); do
                  files=$(printf '%s\\n' "${names[@]}" | shuf | head -20 | sed 's|^|\(dir)/|')
                  \(shq(casfs)) put --quiet --config \(shq(cfg)) $files > /dev/null 2>>\(shq(log)) || echo "put failed" >> \(shq(log))
                  [ $SECONDS -lt $end ] || break
                done
              done
            }
            cleaner() {
              passes=0
              while [ $SECONDS -lt $end ]; do
                \(shq(casfs)) cleanup --config \(shq(cfg)) --high-watermark 1M --low-watermark 256K >> \(shq(evictions)) 2>>\(shq(log)) || echo "cleanup failed" >> \(shq(log))
                passes=$((passes + 1))
              done
              echo "cleanup passes: $passes"
            }
            for i in 1 2 3 4; do cpWriter & done
            for i in 1 2; do putWriter & done
            cleaner &
            wait
            """
        let out = runShell(script)
        XCTAssertTrue(out.ok, "\(out)")
        let failures = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        XCTAssertEqual(failures, "", "writes or cleanups failed during the race")
        XCTAssertGreaterThan(try m.stats()["casfs_writes_stored_total"] ?? 0, 0)
        let cleanupOut = (try? String(contentsOfFile: evictions, encoding: .utf8)) ?? ""
        let evicted = cleanupOut.split(separator: "\n").filter { $0.hasPrefix("deleted sha256/") }.count
        XCTAssertGreaterThan(evicted, 300, "cleanup hardly evicted anything: the race was not run")
        print("cleanup race: \(evicted) evictions, \(out.stdout.trimmingCharacters(in: .whitespacesAndNewlines))")

        // Every indexed blob has its bytes; reindex agrees.
        XCTAssertEqual(indexedWithoutBytes(r), [], "indexed blobs without bytes after the race")
        let dry = mustSh("\(shq(casfs)) reindex --dry-run --config \(shq(cfg))")
        XCTAssertTrue(dry.contains("would drop 0 entries"), dry)
        let sum = indexedDigests(r).map(\.size).reduce(0, +)
        XCTAssertEqual(totalSize(r), sum, "total_size drifted from the indexed sizes:\n\(dry)")

        // Acknowledged writes stay: each blob written once more is there, with its bytes.
        for n in names { mustSh("cp \(shq(dir))/\(n) \(shq(m.sha256))/\(n)") }
        XCTAssertEqual(Set(indexedDigests(r)), Set(digests))
        XCTAssertEqual(indexedWithoutBytes(r), [])
        for d in digests.prefix(50) {
            XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        }
    }

    /// On a small store (20 MiB tmpfs) that a mount serves and reads from,
    /// cleanup to 0 frees the space at once (only a blob a reader still holds
    /// open keeps its space): the next write fits.
    func testCleanupFreesSpaceAtOnceWhileTheMountServesTheStore() throws {
        let small = tmp + "/small"
        try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
        mustSh("mount -t tmpfs -o size=20m casfs-cleanup-test \(shq(small))")
        defer { runShell("umount -l \(shq(small))") }
        let config = indexedDiskConfig(port: try startRedis().port, store: small + "/store")
        let cfg = try configFile(config)
        let m = try mount(config)
        var written: [(String, Digest)] = []
        for i in 0..<8 {
            let (p, d) = try localBlob(randomData(2 << 20, seed: 100 + UInt64(i)))
            mustSh("cp \(shq(p)) \(shq(m.path(d)))")
            written.append((p, d))
        }
        // Every blob read through the mount; one stays open in a reader.
        for (_, d) in written { mustSh("cat \(shq(m.path(d))) > /dev/null") }
        let held = written[0].1
        let reader = Process()
        reader.executableURL = URL(fileURLWithPath: "/bin/bash")
        reader.arguments = ["-c", "exec 7< \(shq(m.path(held))); head -c 1000 <&7 > /dev/null; echo open > \(shq(tmp + "/reader")); exec sleep 600"]
        try reader.run()
        defer {
            reader.terminate()
            reader.waitUntilExit()
        }
        XCTAssertTrue(pollUntil(30) { FileManager.default.fileExists(atPath: tmp + "/reader") }, "the reader did not open the blob")
        let before = try usedBytes(small)
        XCTAssertGreaterThanOrEqual(before, 16 << 20)

        let out = mustSh("\(shq(casfs)) cleanup --config \(shq(cfg)) --high-watermark 0 --low-watermark 0")
        XCTAssertEqual(out.split(separator: "\n").filter { $0.hasPrefix("deleted sha256/") }.count, 8, out)
        for (_, d) in written { XCTAssertFalse(sh("stat \(shq(diskObjectPath(root: small + "/store", d)))").ok) }
        // Only what the open reader holds may still take space.
        let after = try usedBytes(small)
        XCTAssertLessThanOrEqual(after, (2 << 20) + (1 << 20), "deleted blobs still take space: \(after) bytes used")

        // The next write fits (12 MiB: more than was free before the cleanup).
        let (p, d) = try localBlob(randomData(12 << 20, seed: 200))
        let w = sh("cp \(shq(p)) \(shq(m.path(d)))")
        XCTAssertTrue(w.ok, "write after cleanup: \(w)")
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
    }

    /// Bytes in use on the filesystem holding `path`.
    func usedBytes(_ path: String) throws -> Int64 {
        var sv = statvfs()
        guard statvfs(path, &sv) == 0 else { throw TestSupportError("statvfs \(path)") }
        return Int64(sv.f_blocks - sv.f_bfree) * Int64(sv.f_frsize)
    }

    /// Of 10 blobs of one size, aged 10…100 minutes apart, cleanup that must
    /// free 3 blobs' worth deletes exactly the 3 least recently used.
    func testCleanupDeletesTheLeastRecentlyUsed() throws {
        let r = try startRedis()
        let config = try indexedDiskConfig()
        let cfg = try configFile(config)
        let m = try mount(config)
        var digests: [Digest] = []
        for i in 0..<10 {
            let (p, d) = try localBlob(randomData(10_000, seed: 300 + UInt64(i)))
            mustSh("cp \(shq(p)) \(shq(m.path(d)))")
            digests.append(d)
        }
        m.unmount()  // no access-time refresh from the mount from here on
        // Ages in a shuffled order, so that neither write order nor key order is the answer.
        let ages = [40, 90, 10, 70, 100, 20, 60, 30, 80, 50]
        for (d, minutes) in zip(digests, ages) {
            XCTAssertEqual(r.cli("EXPIRE A:\(d) \(RedisIndex.ttlSeconds - Int64(minutes * 60))"), "1\n")
        }
        let oldest = zip(digests, ages).sorted { $0.1 > $1.1 }.prefix(3).map(\.0)
        let out = mustSh("\(shq(casfs)) cleanup --config \(shq(cfg)) --high-watermark 99999 --low-watermark 70000")
        let deleted = out.split(separator: "\n").filter { $0.hasPrefix("deleted sha256/") }.compactMap { Digest(parsing: $0.dropFirst("deleted sha256/".count)) }
        XCTAssertEqual(deleted, oldest, out)
        for d in digests {
            let kept = !oldest.contains(d)
            XCTAssertEqual(try indexed(d), kept, "\(d)")
            XCTAssertEqual(FileManager.default.fileExists(atPath: diskObjectPath(root: storeDir, d)), kept, "\(d)")
        }
        XCTAssertEqual(totalSize(r), 70_000)
    }
}
