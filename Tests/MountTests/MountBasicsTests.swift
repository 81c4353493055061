import CASCore
import Foundation
import TestSupport
import XCTest

final class MountBasicsTests: MountTestCase {
    func testRootListsSha256AndEmptyBlobAlwaysExists() throws {
        let m = try mount(try cachedIndexedConfig())
        XCTAssertEqual(mustSh("ls \(shq(m.mountpoint))"), "sha256\ntree\n")
        let empty = m.path(Digest.empty)
        XCTAssertEqual(mustSh("stat -c '%s %h %a %F' \(shq(empty))"), "0 1 444 regular empty file\n")
        XCTAssertEqual(mustSh("cat \(shq(empty)) | wc -c").trimmingCharacters(in: .whitespaces), "0\n")
        XCTAssertEqual(mustSh("sha256sum < \(shq(empty)) | cut -c1-64"), Digest.empty.hash + "\n")
    }

    func testCopyInThenReadBackAndXattrs() throws {
        let m = try mount(try cachedIndexedConfig())
        let (src, d) = try localBlob(randomData(3 << 20 + 17, seed: 1))
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        XCTAssertEqual(mustSh("cmp \(shq(src)) \(shq(m.path(d))) && echo same"), "same\n")
        XCTAssertEqual(mustSh("stat -c %s \(shq(m.path(d)))"), "\(d.size)\n")
        XCTAssertTrue(FileManager.default.fileExists(atPath: diskObjectPath(root: storeDir, d)), "blob not in the disk store")
        XCTAssertTrue(try indexed(d), "blob not in the Redis index")
        XCTAssertEqual(mustSh("getfattr -n user.casfs.digest --only-values \(shq(m.path(d)))"), d.description)
        XCTAssertEqual(mustSh("getfattr -n user.checksum.sha256 --only-values \(shq(m.path(d))) | od -An -tx1 | tr -d ' \\n'"), d.hash)
        let names = mustSh("getfattr -d -m - \(shq(m.path(d)))")
        XCTAssertTrue(names.contains("user.checksum.sha256") && names.contains("user.casfs.digest"), names)
        XCTAssertFalse(sh("getfattr -n user.nope \(shq(m.path(d)))").ok)
        // Same inode for the same digest, across lookups.
        let ino1 = mustSh("stat -c %i \(shq(m.path(d)))")
        mustSh("echo 3 > /proc/sys/vm/drop_caches")
        XCTAssertEqual(mustSh("stat -c %i \(shq(m.path(d)))"), ino1)
        // Writing an existing blob again: accepted and verified.
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        XCTAssertEqual(try m.stats()["casfs_writes_rejected_total"], 0)
        XCTAssertEqual(mustSh("stat -c %s \(shq(m.path(d)))"), "\(d.size)\n")
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        // Stable across remounts.
        m.unmount()
        try m.mount()
        XCTAssertEqual(mustSh("stat -c %i \(shq(m.path(d)))"), ino1)
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
    }

    func testWrongNameIsRejectedAndNothingStored() throws {
        let m = try mount(try cachedIndexedConfig())
        let (src, d) = try localBlob(randomData(200_000, seed: 2))
        let other = Digest.of(Data("something else".utf8))
        let wrongHash = try Digest(hash: other.hash, size: d.size)
        let wrongSize = try Digest(hash: d.hash, size: d.size + 1)
        let shorter = try Digest(hash: d.hash, size: d.size - 1)
        for bad in [wrongHash, wrongSize, shorter] {
            let r = sh("cp \(shq(src)) \(shq(m.path(bad)))")
            XCTAssertFalse(r.ok, "cp to \(bad) succeeded")
            XCTAssertTrue(r.stderr.contains("Input/output error") || r.stderr.contains("File too large"), r.stderr)
            XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: storeDir, bad)))
            XCTAssertFalse(try indexed(bad), "\(bad) indexed")
            XCTAssertFalse(sh("stat \(shq(m.path(bad)))").ok, "\(bad) visible after a failed write")
        }
        // The real name still works afterwards, and the store holds only it.
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        let objects = mustSh("find \(shq(storeDir + "/cas/objects")) -type f | wc -l")
        XCTAssertEqual(objects.trimmingCharacters(in: .whitespacesAndNewlines), "1")
        XCTAssertEqual(try startRedis().cli("--scan --pattern 'A:*'").split(separator: "\n").map(String.init), ["A:\(d)"])
        XCTAssertGreaterThanOrEqual(try m.stats()["casfs_writes_rejected_total"] ?? 0, 3)
        // Nothing left in the staging directory either.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: m.stagingDir), [])
    }

    func testStatShowsSizeWithoutFetchingAndReadFetchesOnce() throws {
        let data = randomData(1 << 20, seed: 3)
        let d = try placeInDiskStore(data)
        let config = try cachedIndexedConfig()
        try startRedis().cli("SET A:\(d) 1 EX 31536000")
        let m = try mount(config)
        XCTAssertEqual(mustSh("stat -c %s \(shq(m.path(d)))"), "\(d.size)\n")
        XCTAssertEqual(mustSh("ls -l \(shq(m.sha256)) | grep -c \(d.hash)"), "1\n")
        XCTAssertEqual(try m.stats()["casfs_fallback_fetches_total"], 0, "stat/ls fetched bytes")
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        XCTAssertEqual(try m.stats()["casfs_fallback_fetches_total"], 1)
    }

    func testListingRemoveAndStatfs() throws {
        let m = try mount(try cachedIndexedConfig())
        var digests: [Digest] = []
        for i in 0..<150 {
            let (src, d) = try localBlob(randomData(100 + i, seed: 100 + UInt64(i)))
            mustSh("cp \(shq(src)) \(shq(m.path(d)))")
            digests.append(d)
        }
        let listed = mustSh("ls \(shq(m.sha256))").split(separator: "\n").map(String.init)
        XCTAssertEqual(listed.sorted(), digests.map(\.description).sorted())
        XCTAssertEqual(mustSh("ls -f \(shq(m.sha256)) | head -3 | wc -l").trimmingCharacters(in: .whitespaces), "3\n")
        let long = mustSh("ls -l \(shq(m.sha256))")
        XCTAssertEqual(long.split(separator: "\n").filter { $0.hasPrefix("-r--r--r--") }.count, 150)
        // A listing with a small buffer (many readdir calls, resumed by offset) sees each blob once.
        let py = "import os; print('\\n'.join(e.name for e in os.scandir(\(shq(m.sha256)))))"
        let viaScandir = mustSh("python3 -c \(shq(py))").split(separator: "\n").map(String.init)
        XCTAssertEqual(viaScandir.sorted(), digests.map(\.description).sorted())
        // Files: the blob count is what is used; the rest is free (df -i is not 100% used).
        XCTAssertEqual(mustSh("stat -f -c '%c %d' \(shq(m.mountpoint)) | awk '{print $1 - $2}'"), "150\n")
        XCTAssertGreaterThan(Int(mustSh("stat -f -c %d \(shq(m.mountpoint))").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0, 0)
        let total = digests.map(\.size).reduce(0, +)
        let blocks = mustSh("stat -f -c '%b %f %a' \(shq(m.mountpoint))").split(separator: " ").compactMap { Int64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        XCTAssertEqual(blocks.count, 3)
        XCTAssertEqual(blocks[0] - blocks[1], (total + 4095) / 4096, "used blocks are the index's total size")
        XCTAssertGreaterThan(blocks[2], 0, "free space is reported (df is not 100% full)")

        let gone = digests[7]
        mustSh("rm \(shq(m.path(gone)))")
        XCTAssertFalse(sh("stat \(shq(m.path(gone)))").ok)
        XCTAssertFalse(try indexed(gone))
        XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: storeDir, gone)))
        XCTAssertEqual(mustSh("ls \(shq(m.sha256)) | wc -l").trimmingCharacters(in: .whitespaces), "149\n")
        XCTAssertEqual(mustSh("stat -f -c '%c %d' \(shq(m.mountpoint)) | awk '{print $1 - $2}'"), "149\n")
        XCTAssertTrue(sh("rm \(shq(m.path(gone)))").stderr.contains("No such file"))
    }

    func testImmutableBlobsOnWritableMount() throws {
        let m = try mount(try cachedIndexedConfig())
        let (src, d) = try localBlob(randomData(5000, seed: 4))
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        XCTAssertTrue(sh("mkdir \(shq(m.sha256 + "/dir"))").stderr.contains("Operation not permitted"))
        XCTAssertTrue(sh("mkdir \(shq(m.mountpoint + "/dir"))").stderr.contains("Operation not permitted"))
        let other = Digest.of(Data("x".utf8))
        XCTAssertTrue(sh("mv \(shq(m.path(d))) \(shq(m.path(other)))").stderr.contains("Operation not permitted"))
        XCTAssertTrue(sh("chmod 777 \(shq(m.path(d)))").stderr.contains("Operation not permitted"))
        XCTAssertTrue(sh("truncate -s 0 \(shq(m.path(d)))").stderr.contains("Operation not permitted"))
        XCTAssertTrue(sh("ln -s x \(shq(m.sha256 + "/link"))").stderr.contains("Operation not permitted"))
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
    }

    func testReadOnlyMountRefusesChanges() throws {
        let config = try cachedIndexedConfig(writable: true)
        let (src, d) = try localBlob(randomData(4096, seed: 5))
        let m = try mount(config, options: ["ro"])
        XCTAssertEqual(mustSh("stat -c %a \(shq(m.path(Digest.empty)))"), "444\n")
        let r = sh("cp \(shq(src)) \(shq(m.path(d)))")
        XCTAssertFalse(r.ok)
        XCTAssertTrue(r.stderr.contains("Read-only file system"), r.stderr)
        XCTAssertFalse(try indexed(d))
        m.unmount()
        // Put it there through a writable mount, then check every change is EROFS.
        try m.mount(extraOptions: ["rw"])
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        m.unmount()
        try m.mount(extraOptions: ["ro"])
        for cmd in ["rm -f \(shq(m.path(d)))", "mkdir \(shq(m.sha256 + "/x"))", "touch \(shq(m.path(Digest.of(Data("y".utf8)))))",
                    "sh -c 'echo > \(m.path(d))'", "chmod 600 \(shq(m.path(d)))",
                    "setfattr -n user.a -v b \(shq(m.path(d)))"] {
            let r = sh(cmd)
            XCTAssertFalse(r.ok, cmd)
            XCTAssertTrue(r.stderr.contains("Read-only file system"), "\(cmd): \(r.stderr)")
        }
        XCTAssertTrue(try indexed(d))
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
    }

    func testMalformedNamesAreEnoentOrEinval() throws {
        let m = try mount(try cachedIndexedConfig())
        let h = Digest.of(Data("abc".utf8)).hash
        var names = [
            "x", "_", "\(h)", "\(h)_", "\(h)_01", "\(h)_-1", "\(h)_+1", "\(h)_1 ", " \(h)_1", "\(h)_1x",
            "\(h)_99999999999999999999", "\(h)_9223372036854775808", h.uppercased() + "_3", String(h.dropLast()) + "_3",
            String(h.dropLast()) + "g_3", h + "0_3", "\(h)__3", "\(h)_3_3", "\(h).3", "\(h)_３", "é\(h.dropFirst(2))_3",
            "..x", "-\(h.dropFirst())_3", "\(h)_0x3",
        ]
        var g = SplitMix(42)
        let alphabet = Array("0123456789abcdefABCDEF_-+ .xz")
        for _ in 0..<40 {
            let len = Int(g.next() % 90) + 1
            let s = String((0..<len).map { _ in alphabet[Int(g.next() % UInt64(alphabet.count))] })
            if Digest(parsing: s) == nil, !s.hasPrefix("-"), s != ".", s != ".." { names.append(s) }
        }
        for name in names {
            let p = m.sha256 + "/" + name
            let st = sh("stat -- \(shq(p))")
            XCTAssertFalse(st.ok, "stat \(name)")
            XCTAssertTrue(st.stderr.contains("No such file"), "stat \(name): \(st.stderr)")
            let c = sh("touch -- \(shq(p))")
            XCTAssertFalse(c.ok, "create \(name)")
            XCTAssertTrue(c.stderr.contains("Invalid argument"), "create \(name): \(c.stderr)")
        }
        XCTAssertTrue(m.isRunning, "daemon died")
        XCTAssertEqual(mustSh("ls \(shq(m.sha256)) | wc -l").trimmingCharacters(in: .whitespaces), "0\n")
        XCTAssertFalse(sh("stat \(shq(m.mountpoint + "/nope"))").ok)
    }

    /// Opening a blob refreshes its access time (the TTL of its index key), off the read path.
    func testOpenRefreshesAccessTime() throws {
        let data = randomData(10_000, seed: 12)
        let d = try placeInDiskStore(data)
        let redis = try startRedis()
        let config = try indexedDiskConfig()
        redis.cli("SET A:\(d) 1 EX 1000")
        let m = try mount(config)
        XCTAssertEqual(mustSh("stat -c %s \(shq(m.path(d)))"), "\(d.size)\n")
        let ttl = { Int(redis.cli("TTL A:\(d)").trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1 }
        XCTAssertLessThanOrEqual(ttl(), 1000, "a stat refreshed the access time")
        XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        XCTAssertTrue(pollUntil(30) { ttl() > 1000 }, "open did not refresh the access time (TTL \(ttl()))")
    }

    /// -o noopen (read-only): the kernel serves opens itself; reads still verify,
    /// access times are refreshed at lookup, writable mounts refuse the option.
    func testNoOpenReadOnlyMount() throws {
        let data = randomData(300_000, seed: 13)
        let d = try placeInDiskStore(data)
        let redis = try startRedis()
        let config = try indexedDiskConfig(writable: false)
        redis.cli("SET A:\(d) 1 EX 1000")
        let m = try mount(config, options: ["ro,noopen"])
        for _ in 0..<3 {
            XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n")
        }
        XCTAssertEqual(mustSh("getfattr -n user.casfs.digest --only-values \(shq(m.path(d)))"), d.description)
        XCTAssertLessThanOrEqual(try m.stats()["casfs_fuse_requests_total{op=\"open\"}"] ?? 99, 1, "the kernel kept sending OPEN")
        let ttl = { Int(redis.cli("TTL A:\(d)").trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1 }
        XCTAssertTrue(pollUntil(30) { ttl() > 1000 }, "lookup did not refresh the access time")
        XCTAssertTrue(sh("cp /etc/hostname \(shq(m.path(Digest.of(Data("z".utf8)))))").stderr.contains("Read-only file system"))
        m.unmount()
        XCTAssertThrowsError(try m.mount(extraOptions: ["rw,noopen"]))
        XCTAssertTrue(m.log.contains("noopen"), m.log)
    }
}
