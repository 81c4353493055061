import CASCore
import Foundation
import REAPI
import SwiftProtobuf
import TestSupport
import XCTest

/// Sizes from outside (names, Directory messages, index keys, the index's
/// total) up to 2^63−1 never kill the daemon: each is an error or a value
/// shown as it is, and the mount keeps serving.
final class HostileSizeTests: MountTestCase {
    typealias PBDirectory = Build_Bazel_Remote_Execution_V2_Directory
    static let huge = Int64.max

    func pb(hash: String, size: Int64) -> Build_Bazel_Remote_Execution_V2_Digest { .with { $0.hash = hash; $0.sizeBytes = size } }

    /// A hash no blob has (seeded, so failures reproduce).
    func randomHash(_ g: inout SplitMix) -> String {
        (0..<4).map { _ in String(format: "%016llx", g.next()) }.joined()
    }

    /// The daemon runs and the mount serves `known` byte for byte.
    func assertServes(_ mountpoint: String, daemonRunning: Bool, _ known: (path: String, digest: Digest), _ context: String,
                      log: @autoclosure () -> String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(daemonRunning, "daemon died after \(context); log:\n\(log().suffix(4000))", file: file, line: line)
        let r = sh("cmp \(shq(known.path)) \(shq(mountpoint + "/sha256/\(known.digest)"))")
        XCTAssertTrue(r.ok, "after \(context) the mount does not serve \(known.digest): \(r)", file: file, line: line)
    }

    /// Stores bytes through a writable mount.
    func store(_ data: Data, _ m: CasfsMount, file: StaticString = #filePath, line: UInt = #line) throws -> Digest {
        let (path, d) = try localBlob(data)
        let r = sh("cp \(shq(path)) \(shq(m.path(d)))")
        XCTAssertTrue(r.ok, "storing \(d): \(r)\nlog:\n\(m.log.split(separator: "\n").filter { $0.contains(d.hash) }.joined(separator: "\n"))",
                      file: file, line: line)
        return d
    }

    // MARK: (a) a Directory naming a file of 2^63−1 bytes

    func testDirectoryWithAHugeFileIsListedAndTheMountServes() throws {
        let m = try mount(try cachedIndexedConfig(writable: true))
        let ro = try mount(try cachedIndexedConfig(writable: false), options: ["ro"], name: "ro")
        let known = try localBlob(randomData(100_000, seed: 1))
        mustSh("cp \(shq(known.path)) \(shq(m.path(known.digest)))")
        let dir = PBDirectory.with {
            $0.files = [.with { $0.name = "big"; $0.digest = pb(hash: known.digest.hash, size: Self.huge) }]
        }
        let bytes: Data = try dir.serializedBytes()
        XCTAssertEqual(bytes.count, 85)
        let d = try store(bytes, m)
        for (mp, running, log) in [(m.mountpoint, { m.isRunning }, { m.log }), (ro.mountpoint, { ro.isRunning }, { ro.log })] {
            let tree = mp + "/tree/\(d)"
            let listing = sh("ls -l \(shq(tree))")
            XCTAssertTrue(listing.ok, "\(mp): \(listing)")
            XCTAssertTrue(listing.stdout.contains(" \(Self.huge) ") && listing.stdout.contains("big"), listing.stdout)
            XCTAssertEqual(mustSh("stat -c %s \(shq(tree + "/big"))"), "\(Self.huge)\n")
            XCTAssertTrue(mustSh("ls -ls \(shq(tree))").contains("big"))
            // Its bytes are nowhere: reading is an error, not a crash.
            let cat = sh("head -c 16 \(shq(tree + "/big"))")
            XCTAssertFalse(cat.ok, "read bytes of a blob nobody has")
            XCTAssertTrue(cat.stderr.contains("Input/output error") || cat.stderr.contains("No such file"), cat.stderr)
            let tail = sh("dd if=\(shq(tree + "/big")) of=/dev/null bs=1 count=1 iflag=skip_bytes skip=\(Self.huge - 1) status=none")
            XCTAssertFalse(tail.ok, "read the last byte of a blob nobody has")
            assertServes(mp, daemonRunning: running(), known, "ls -l of a tree with a file of 2^63-1 bytes", log: log())
        }
        // A subdirectory of 2^63−1 bytes: too large to be a Directory, an error.
        let withSub = try store(try PBDirectory.with {
            $0.directories = [.with { $0.name = "sub"; $0.digest = pb(hash: known.digest.hash, size: Self.huge) }]
        }.serializedBytes(), m)
        for (mp, running, log) in [(m.mountpoint, { m.isRunning }, { m.log }), (ro.mountpoint, { ro.isRunning }, { ro.log })] {
            let tree = mp + "/tree/\(withSub)"
            XCTAssertEqual(mustSh("ls \(shq(tree))"), "sub\n")
            let sub = sh("ls -l \(shq(tree + "/sub"))")
            XCTAssertFalse(sub.ok)
            XCTAssertTrue(sub.stderr.contains("Input/output error"), sub.stderr)
            XCTAssertFalse(sh("ls -l \(shq(tree))").ok, "ls -l cannot stat sub")
            assertServes(mp, daemonRunning: running(), known, "ls -l of a subdirectory of 2^63-1 bytes", log: log())
        }
    }

    // MARK: (b) creating a name of 2^63−1 bytes

    func testTouchOfAHugeNameFailsCleanly() throws {
        let m = try zeroConfigMount()
        let known = try localBlob(randomData(50_000, seed: 2))
        mustSh("cp \(shq(known.path)) \(shq(m.path(known.digest)))")
        let name = "\(known.digest.hash)_\(Self.huge)"
        let r = sh("touch \(shq(m.sha256 + "/" + name))")
        XCTAssertFalse(r.ok, "touch of a name that can never be complete succeeded")
        XCTAssertTrue(["Invalid argument", "Input/output error", "File too large", "No space left"].contains { r.stderr.contains($0) },
                      r.stderr)
        XCTAssertFalse(sh("stat \(shq(m.sha256 + "/" + name))").ok, "the name exists after a failed create")
        XCTAssertEqual(m.redis("EXISTS \(shq("A:" + name))").trimmingCharacters(in: .whitespacesAndNewlines), "0")
        // Writing into it cannot pass the name's size either.
        let w = sh("head -c 4096 \(shq(known.path)) > \(shq(m.sha256 + "/" + name))")
        XCTAssertFalse(w.ok)
        assertServes(m.mountpoint, daemonRunning: m.isRunning, known, "touch of a 2^63-1 name", log: m.log)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: m.dataDirectory + "/staging"), [])
    }

    // MARK: (c) an index key of 2^63−1 bytes in a shared Redis

    func testHugeIndexKeyInASharedRedisIsListedOrSkipped() throws {
        let redis = try startRedis()
        let m = try mount(try cachedIndexedConfig(writable: true))
        let ro = try mount(try cachedIndexedConfig(writable: false), options: ["ro"], name: "ro")
        let known = try localBlob(randomData(70_000, seed: 3))
        mustSh("cp \(shq(known.path)) \(shq(m.path(known.digest)))")
        var g = SplitMix(3)
        let name = "\(randomHash(&g))_\(Self.huge)"
        XCTAssertEqual(redis.cli("SET \(shq("A:" + name)) 1 EX 3600").trimmingCharacters(in: .whitespacesAndNewlines), "OK")
        for (mp, running, log) in [(m.mountpoint, { m.isRunning }, { m.log }), (ro.mountpoint, { ro.isRunning }, { ro.log })] {
            let listing = sh("ls -l \(shq(mp + "/sha256"))")
            XCTAssertTrue(listing.ok, "\(mp): \(listing)")
            let line = listing.stdout.split(separator: "\n").first { $0.hasSuffix(name) }
            if let line { XCTAssertTrue(line.contains(" \(Self.huge) "), "\(line)") }
            XCTAssertTrue(listing.stdout.contains(known.digest.description), listing.stdout)
            let cat = sh("head -c 16 \(shq(mp + "/sha256/" + name))")
            XCTAssertFalse(cat.ok)
            assertServes(mp, daemonRunning: running(), known, "ls -l with an index key of 2^63-1 bytes", log: log())
        }
    }

    // MARK: (d) the index's total size out of range

    /// `df` and `stat -f` answer with clamped values whatever `total_size` holds.
    func checkStatfs(_ mp: String, totalSize raw: String, set: (String) -> Void, file: StaticString = #filePath, line: UInt = #line) {
        set(raw)
        let df = sh("df -B4096 --output=size,used,avail,pcent \(shq(mp))")
        XCTAssertTrue(df.ok, "df with total_size \(raw): \(df)", file: file, line: line)
        XCTAssertTrue(sh("df -i \(shq(mp))").ok, "df -i with total_size \(raw)", file: file, line: line)
        let st = sh("stat -f -c '%b %f %a %c %d' \(shq(mp))")
        XCTAssertTrue(st.ok, "stat -f with total_size \(raw): \(st)", file: file, line: line)
        let v = st.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { UInt64($0) }
        guard v.count == 5 else { return XCTFail("stat -f: \(st.stdout)", file: file, line: line) }
        XCTAssertLessThanOrEqual(v[1], v[0], "free > total with total_size \(raw)", file: file, line: line)
        XCTAssertLessThanOrEqual(v[2], v[0], "available > total with total_size \(raw)", file: file, line: line)
        XCTAssertLessThanOrEqual(v[4], v[3], "free files > files with total_size \(raw)", file: file, line: line)
        let used = v[0] - v[1]
        if let n = Int64(raw), n > 0 {
            XCTAssertEqual(used, UInt64(n.blocks(of: 4096)), "used blocks for total_size \(raw)", file: file, line: line)
        } else {
            XCTAssertEqual(used, 0, "used blocks for total_size \(raw) (not a size)", file: file, line: line)
        }
    }

    static let outOfRangeTotals = [
        "9223372036854775807", "9223372036854775806", "9223372036854775808", "18446744073709551616",
        "-1", "-9223372036854775808", "garbage", "''", "1e30", "0x10", "4096",
    ]

    func testTotalSizeOutOfRangeOnASharedRedis() throws {
        let redis = try startRedis()
        let m = try mount(try cachedIndexedConfig(writable: true))
        let known = try localBlob(randomData(40_000, seed: 4))
        mustSh("cp \(shq(known.path)) \(shq(m.path(known.digest)))")
        for raw in Self.outOfRangeTotals {
            checkStatfs(m.mountpoint, totalSize: raw == "''" ? "" : raw) { redis.cli("SET total_size \(shq($0))") }
            assertServes(m.mountpoint, daemonRunning: m.isRunning, known, "total_size \(raw)", log: m.log)
        }
    }

    func testTotalSizeOutOfRangeOnTheZeroConfigStack() throws {
        let m = try zeroConfigMount()
        let known = try localBlob(randomData(40_000, seed: 5))
        mustSh("cp \(shq(known.path)) \(shq(m.path(known.digest)))")
        for raw in Self.outOfRangeTotals {
            checkStatfs(m.mountpoint, totalSize: raw == "''" ? "" : raw) { m.redis("SET total_size \(shq($0))") }
            assertServes(m.mountpoint, daemonRunning: m.isRunning, known, "total_size \(raw)", log: m.log)
        }
        // A counter that is not a number does not keep the store from mounting
        // again; the mount's reindex puts the right total back.
        m.redis("SET total_size garbage")
        m.unmount()
        try m.mount()
        assertServes(m.mountpoint, daemonRunning: m.isRunning, known, "a remount over total_size garbage", log: m.log)
        XCTAssertTrue(pollUntil(60) { m.redis("GET total_size").trimmingCharacters(in: .whitespacesAndNewlines) == "\(known.digest.size)" },
                      "total_size is \(m.redis("GET total_size"))")
    }

    // MARK: (e) fuzz

    /// Boundary and random sizes through names, index keys, Directory
    /// messages and the total, batch by batch; after each batch the daemon
    /// runs and serves a known blob byte for byte.
    func testSizeFuzzNeverKillsTheDaemon() throws {
        let redis = try startRedis()
        let m = try mount(try cachedIndexedConfig(writable: true))
        let ro = try mount(try cachedIndexedConfig(writable: false), options: ["ro"], name: "ro")
        let known = try localBlob(randomData(300_000, seed: 6))
        mustSh("cp \(shq(known.path)) \(shq(m.path(known.digest)))")
        var g = SplitMix(2026)
        var sizes: [Int64] = [0, 1, 1 << 31 - 1, 1 << 31, 1 << 32 - 1, 1 << 32, 1 << 32 + 1, 1 << 53, 1 << 53 + 1,
                              1 << 62, Int64.max - 1, Int64.max, known.digest.size - 1, known.digest.size + 1,
                              TreeLimit.directory, TreeLimit.directory + 1]
        for _ in 0..<32 { sizes.append(Int64(bitPattern: g.next() >> (1 + g.next() % 63))) }
        let batchSize = 8
        var checked = 0
        for start in stride(from: 0, to: sizes.count, by: batchSize) {
            let batch = sizes[start..<min(start + batchSize, sizes.count)]
            for s in batch {
                let h = randomHash(&g)
                let name = "\(h)_\(s)"
                // Names: absent, not creatable as complete, unreadable.
                for n in [name, "\(known.digest.hash)_\(s)"] where n != known.digest.description {
                    let st = sh("stat -c %s \(shq(m.sha256 + "/" + n))")
                    XCTAssertFalse(st.ok, "stat \(n) succeeded")
                    XCTAssertTrue(st.stderr.contains("No such file"), "stat \(n): \(st.stderr)")
                    XCTAssertFalse(sh("cat \(shq(ro.sha256 + "/" + n)) >/dev/null").ok)
                }
                if s > 0 {
                    XCTAssertFalse(sh("touch \(shq(m.sha256 + "/" + name))").ok, "touch \(name) succeeded")
                }
                // Reads of a real blob at that offset: bytes or end of file.
                let dd = sh("dd if=\(shq(m.path(known.digest))) bs=1 count=1 iflag=skip_bytes skip=\(s) status=none | od -An -tu1")
                XCTAssertTrue(dd.ok, "dd skip=\(s): \(dd)")
                // An index key of that size: listed (or skipped), never fatal.
                redis.cli("SET \(shq("A:" + name)) 1 EX 3600")
                XCTAssertTrue(sh("ls -l \(shq(m.sha256)) >/dev/null").ok, "ls -l with key \(name)")
                XCTAssertTrue(sh("ls -l \(shq(ro.sha256)) >/dev/null").ok, "ls -l (ro) with key \(name)")
                _ = sh("stat \(shq(ro.sha256 + "/" + name)); head -c 1 \(shq(ro.sha256 + "/" + name))")
                XCTAssertFalse(sh("head -c 1 \(shq(m.sha256 + "/" + name)) >/dev/null").ok, "read bytes of \(name)")
                // A Directory naming a file and a subdirectory of that size.
                let dir = PBDirectory.with {
                    $0.files = [.with { $0.name = "f"; $0.digest = pb(hash: h, size: s) }]
                    $0.directories = [.with { $0.name = "sub"; $0.digest = pb(hash: randomHash(&g), size: s) }]
                }
                let d = try store(try dir.serializedBytes(), m)
                for mp in [m.mountpoint, ro.mountpoint] {
                    let tree = mp + "/tree/\(d)"
                    let listing = sh("ls -l \(shq(tree))")
                    let fLine = listing.stdout.split(separator: "\n").first { $0.hasSuffix(" f") }
                    XCTAssertTrue(fLine?.contains(" \(s) ") == true, "\(tree): \(listing)")
                    XCTAssertEqual(sh("stat -c %s \(shq(tree + "/f"))").stdout, "\(s)\n")
                    XCTAssertFalse(sh("ls \(shq(tree + "/sub"))").ok, "listed a subdirectory nobody has")
                    if s > 0 { XCTAssertFalse(sh("head -c 1 \(shq(tree + "/f")) >/dev/null").ok) }
                }
                // The total: clamped in statfs.
                for raw in ["\(s)", "-\(s)"] {
                    redis.cli("SET total_size \(shq(raw))")
                    XCTAssertTrue(sh("df \(shq(m.mountpoint)) && stat -f \(shq(ro.mountpoint))").ok, "df with total_size \(raw)")
                }
                checked += 1
            }
            let context = "sizes \(Array(batch))"
            assertServes(m.mountpoint, daemonRunning: m.isRunning, known, context, log: m.log)
            assertServes(ro.mountpoint, daemonRunning: ro.isRunning, known, context, log: ro.log)
        }
        XCTAssertEqual(checked, sizes.count)
        XCTAssertTrue(m.isRunning && ro.isRunning)
    }
}

enum TreeLimit {
    /// Directory blobs above this size are refused (TreeDirectory.maxBlobSize).
    static let directory: Int64 = 128 << 20
}
