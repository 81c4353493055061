import CASCore
import Foundation
import REAPI
import SwiftProtobuf
import TestSupport
import XCTest

/// What a fresh mount costs: listings that do the lookups' work, existence
/// answered from memory, small blobs pushed into the page cache. Requests
/// and fetches are counted through the mount's metrics and Redis's own
/// command statistics, never timed.
final class ColdPathTests: MountTestCase {
    /// `casfs put --tree` with the configuration `config` (YAML text).
    func putTree(_ dir: String, config: String) throws -> Digest {
        let path = tmp + "/put.yaml"
        try config.write(toFile: path, atomically: true, encoding: .utf8)
        let out = mustSh("\(shq(try casfsBinary())) put --quiet --tree --config \(shq(path)) \(shq(dir))")
        return try Digest.parse(String(out.split(separator: " ").first ?? "").dropFirst(5))
    }

    /// DIRS directories of FILES small files (distinct bytes), a nested
    /// directory and a symlink in each.
    func makeTree(dirs: Int, files: Int, size: Int = 3000) -> String {
        let src = tmp + "/src-\(dirs)-\(files)"
        let py = """
            import os, random
            r = random.Random(\(dirs * 1000 + files))
            for d in range(\(dirs)):
                p = os.path.join("\(src)", "d%02d" % d)
                os.makedirs(os.path.join(p, "nested"))
                open(os.path.join(p, "nested", "deep"), "wb").write(b"deep %d" % d)
                os.symlink("f000", os.path.join(p, "link"))
                for f in range(\(files)):
                    open(os.path.join(p, "f%03d" % f), "wb").write(r.randbytes(\(size)))
            """
        mustSh("python3 -c \(shq(py))")
        return src
    }

    func stat(_ m: CasfsMount, _ key: String) throws -> Int64 { try m.stats()[key] ?? 0 }
    func requests(_ m: CasfsMount, _ op: String) throws -> Int64 { try stat(m, "casfs_fuse_requests_total{op=\"\(op)\"}") }

    func testListingsDoTheLookupsWork() throws {
        let config = try indexedDiskConfig(writable: false)
        let src = makeTree(dirs: 3, files: 20)
        let root = try putTree(src, config: config)
        let m = try mount(config)
        let tree = m.mountpoint + "/tree/\(root)"
        let before = try requests(m, "lookup")
        let listing = mustSh("cd \(shq(tree)) && ls -lR")
        XCTAssertTrue(listing.contains("f019") && listing.contains("link -> f000") && listing.contains("deep"), listing)
        // The root's digest ("tree" came with the mount root's listing); every
        // other name came with a READDIRPLUS.
        XCTAssertEqual(try requests(m, "lookup") - before, 1, "lookups for ls -lR of a fresh tree")
        XCTAssertEqual(mustSh("cd \(shq(tree)) && find . | sort"), mustSh("cd \(shq(src)) && find . | sort"))
        XCTAssertEqual(try requests(m, "lookup") - before, 1, "find after ls -lR")
        // A name the tree does not have is asked once (it never appears later).
        XCTAssertFalse(sh("stat \(shq(tree + "/d00/nothing"))").ok)
        XCTAssertFalse(sh("stat \(shq(tree + "/d00/nothing"))").ok)
        XCTAssertEqual(try requests(m, "lookup") - before, 2)
    }

    func testExistenceIsAnsweredFromMemoryUntilADelete() throws {
        let redis = try startRedis()
        let m = try mount(try indexedDiskConfig(), options: ["entry_timeout=0", "attr_timeout=0", "negative_timeout=0"])
        let (src, d) = try localBlob(randomData(100_000, seed: 90))
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        func existsCalls() -> Int {
            let info = redis.cli("INFO commandstats")
            guard let line = info.split(separator: "\n").first(where: { $0.hasPrefix("cmdstat_exists:") }),
                  let calls = line.split(separator: ",").first?.split(separator: "=").last else { return 0 }
            return Int(calls) ?? 0
        }
        let before = existsCalls()
        for _ in 0..<10 { mustSh("stat \(shq(m.path(d)))") }
        XCTAssertLessThanOrEqual(existsCalls() - before, 1, "ten lookups, at most one EXISTS")
        XCTAssertGreaterThanOrEqual(try stat(m, "casfs_existence_cache_hits_total"), 9)
        // A delete through the mount is seen at once.
        mustSh("rm \(shq(m.path(d)))")
        let gone = sh("stat \(shq(m.path(d)))")
        XCTAssertFalse(gone.ok)
        XCTAssertTrue(gone.stderr.contains("No such file"), gone.stderr)

        // A delete made elsewhere (behind the mount's back): the name may
        // still be believed present, but a read finds nothing: no such
        // file, never other bytes; then the name is gone.
        let (src2, d2) = try localBlob(randomData(50_000, seed: 91))
        mustSh("cp \(shq(src2)) \(shq(m.path(d2)))")
        mustSh("stat \(shq(m.path(d2)))")
        redis.cli("DEL A:\(d2)")
        try FileManager.default.removeItem(atPath: diskObjectPath(root: storeDir, d2))
        let read = sh("cat \(shq(m.path(d2))) | wc -c")
        XCTAssertTrue(read.stderr.contains("No such file"), read.stderr)
        XCTAssertEqual(read.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "0")
        XCTAssertTrue(sh("stat \(shq(m.path(d2))) 2>&1").stdout.contains("No such file"))
        XCTAssertTrue(m.isRunning)
    }

    func testListedSmallFilesAreReadWithoutTheDaemon() throws {
        let config = try indexedDiskConfig(writable: false)
        let src = makeTree(dirs: 2, files: 50)
        let root = try putTree(src, config: config)
        let m = try mount(config)
        let tree = m.mountpoint + "/tree/\(root)"
        mustSh("ls -lR \(shq(tree)) >/dev/null")
        // 2 x (50 files + nested/deep) handed out by listings: pushed.
        XCTAssertTrue(pollUntil(60) { (try? self.stat(m, "casfs_page_stores_total")) ?? 0 >= 102 },
                      "stores: \((try? m.stats())?.filter { $0.key.contains("page_store") } ?? [:])")
        let reads = try requests(m, "read")
        XCTAssertEqual(mustSh("cd \(shq(tree)) && find . -type f | sort | xargs cat | sha256sum"),
                       mustSh("cd \(shq(src)) && find . -type f | sort | xargs cat | sha256sum"))
        XCTAssertEqual(try requests(m, "read") - reads, 0, "every small file came from the page cache")
        XCTAssertGreaterThanOrEqual(try stat(m, "casfs_page_store_bytes_total"), 2 * (50 * 3000 + 6))
    }

    /// On an open-less mount, a lookup of a small blob opens it (that says
    /// whether it is there) instead of asking the index, and the READ that
    /// follows uses what the lookup opened.
    func testSmallBlobLookupsDoNotAskTheIndex() throws {
        let redis = try startRedis()
        let config = try indexedDiskConfig()
        let w = try mount(config, name: "w")
        var digests: [Digest] = []
        for i in 0..<20 {
            let (src, d) = try localBlob(randomData(1000 + i, seed: 100 + UInt64(i)))
            mustSh("cp \(shq(src)) \(shq(w.path(d)))")
            digests.append(d)
        }
        let m = try mount(config, options: ["ro"])
        func existsCalls() -> Int {
            let info = redis.cli("INFO commandstats")
            guard let line = info.split(separator: "\n").first(where: { $0.hasPrefix("cmdstat_exists:") }),
                  let calls = line.split(separator: ",").first?.split(separator: "=").last else { return 0 }
            return Int(calls) ?? 0
        }
        let before = existsCalls()
        for d in digests { XCTAssertEqual(mustSh("sha256sum < \(shq(m.path(d))) | cut -c1-64"), d.hash + "\n") }
        XCTAssertEqual(existsCalls() - before, 0, "no EXISTS for the lookups")
        // An absent name is still absent (and a large blob still asks the index).
        XCTAssertFalse(sh("stat \(shq(m.path(Digest.of(Data("absent".utf8)))))").ok)
        XCTAssertEqual(try requests(m, "read"), 20)
    }

    /// Bytes that do not match their name are never pushed: a damaged store
    /// file (no proof) under a tree file and under a /sha256 name.
    func testDamagedBlobsAreNotPushed() throws {
        let store = storeDir
        let config = """
            storage: !disk-storage
              path: \(store)
            mount:
              writable: false

            """
        let src = makeTree(dirs: 1, files: 5, size: 2000)
        let root = try putTree(src, config: config)
        // Damage one file of the tree: other bytes of the same length, no proof.
        let victim = Digest.of(try Data(contentsOf: URL(fileURLWithPath: src + "/d00/f002")))
        let path = diskObjectPath(root: store, victim)
        try FileManager.default.removeItem(atPath: path)
        try randomData(2000, seed: 999).write(to: URL(fileURLWithPath: path))
        let m = try mount(config)
        let tree = m.mountpoint + "/tree/\(root)"
        mustSh("ls -l \(shq(tree + "/d00")) >/dev/null")
        XCTAssertTrue(pollUntil(60) { (try? self.stat(m, "casfs_page_stores_total")) ?? 0 >= 4 })
        let r = sh("cat \(shq(tree + "/d00/f002")) | wc -c")
        XCTAssertTrue(r.stderr.contains("Input/output error") || r.stderr.contains("No such file"), r.stderr)
        XCTAssertEqual(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "0", "no byte of the damaged file was read")
        XCTAssertEqual(mustSh("cat \(shq(tree + "/d00/f001")) | sha256sum"), mustSh("cat \(shq(src + "/d00/f001")) | sha256sum"))
        XCTAssertGreaterThanOrEqual(try stat(m, "casfs_verify_failures_total"), 1)
        XCTAssertTrue(m.isRunning)
    }
}

/// A directory much bigger than the tree cache: its children's lookups do
/// not load it again while the kernel holds it.
final class GiantDirectoryTests: MountTestCase {
    func testChildLookupsOfAHeldDirectoryDoNotReloadIt() throws {
        let count = 20_000
        // One Directory of `count` files (all the same small blob), stored with put.
        let content = Data("same\n".utf8)
        let contentDigest = Digest.of(content)
        var dir = Build_Bazel_Remote_Execution_V2_Directory()
        dir.files = (0..<count).map { i in
            .with {
                $0.name = String(format: "e%06d", i)
                $0.digest = .with { $0.hash = contentDigest.hash; $0.sizeBytes = contentDigest.size }
            }
        }
        let bytes: Data = try dir.serializedBytes()
        let (dirFile, dirDigest) = try localBlob(bytes, name: "directory")
        let (contentFile, _) = try localBlob(content, name: "content")
        let config = """
            storage: !disk-storage
              path: \(storeDir)
            mount:
              writable: false
              tree-cache-size: 64K

            """
        try config.write(toFile: tmp + "/put.yaml", atomically: true, encoding: .utf8)
        mustSh("\(shq(try casfsBinary())) put --quiet --config \(shq(tmp + "/put.yaml")) \(shq(dirFile)) \(shq(contentFile))")
        let m = try mount(config)
        let path = m.mountpoint + "/tree/\(dirDigest)"
        XCTAssertEqual(mustSh("ls -l \(shq(path)) | grep -c '^-r--r--r--'"), "\(count)\n")
        let loads = try m.stats()["casfs_tree_directory_loads_total"] ?? 0
        // The directory held open; its children dropped from the kernel's
        // caches and looked up again, one by one.
        let py = """
            import os, sys
            fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            n = 0
            for i in range(\(count)):
                n += os.stat("e%06d" % i, dir_fd=fd).st_size
            print(n)
            """
        XCTAssertEqual(mustSh("python3 -c \(shq(py)) \(shq(path))"), "\(count * content.count)\n")
        let after = try m.stats()
        XCTAssertGreaterThan(after["casfs_fuse_requests_total{op=\"lookup\"}"] ?? 0, Int64(count / 2), "the children were looked up again")
        XCTAssertLessThanOrEqual((after["casfs_tree_directory_loads_total"] ?? 0) - loads, 1, "the directory was not loaded again")
        // Forgotten by the kernel: the daemon lets go of the nodes.
        mustSh("echo 2 > /proc/sys/vm/drop_caches")
        XCTAssertTrue(pollUntil(30) { ((try? m.stats())?["casfs_inodes"] ?? Int64(count)) < Int64(count / 2) },
                      "file nodes held after the kernel let go: \(String(describing: try? m.stats()["casfs_inodes"]))")
        XCTAssertTrue(m.isRunning)
    }
}
