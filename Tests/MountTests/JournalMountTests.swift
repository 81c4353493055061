import CASCore
import Foundation
import TestSupport
import XCTest

/// The deferred-write journal is untrusted input: an entry edited while the
/// fallback does not take it is never served nor sent; planted files and
/// links are refused; an unsafe journal directory stops the mount; with a
/// BuildGrid fallback a damaged entry is replaced by the cache's proven
/// copy or dropped, never sent nor retried forever.
final class JournalMountTests: MountTestCase {
    var casfs: String { (try? casfsBinary()) ?? "casfs" }
    var server: BuildGridServer?

    override func tearDown() {
        server?.resume()
        super.tearDown()
        server?.stop()
        server = nil
    }

    var journal: String { tmp + "/journal" }

    func deferredIndexConfig(_ r: TestRedis, cacheSize: String) -> String {
        """
        storage: !with-cache-storage
          cache: !lru-storage
            size: \(cacheSize)
          fallback: !redis-index
            redis: !redis-connection
              host: 127.0.0.1
              port: \(r.port)
            storage: !disk-storage
              path: \(storeDir)
          defer-fallback-writes: true
          journal: \(journal)
        mount:
          writable: true

        """
    }

    func entry(_ d: Digest) -> String { journal + "/" + d.description }
    func aside(_ sub: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: journal + "/" + sub)) ?? []).sorted()
    }
    func objects() -> [String] {
        mustSh("find \(shq(storeDir + "/cas/objects")) -type f 2>/dev/null").split(separator: "\n").map(String.init)
    }

    /// Redis out of memory: every deferred send fails and is retried, so the
    /// entries wait in the journal. One is edited (`dd conv=notrunc`) after
    /// the memory cache dropped its copy: reading it fails (never exit 0
    /// with its bytes), and once Redis has room the others are sent, that
    /// one never: it lies in `damaged/`.
    func testEditedEntryWhileTheFallbackStallsIsNeverServedNorSent() throws {
        let r = try startRedis()
        let m = try mount(deferredIndexConfig(r, cacheSize: "10M"))
        r.cli("CONFIG SET maxmemory-policy noeviction")
        r.cli("CONFIG SET maxmemory 1")
        let blobs = try (0..<3).map { try localBlob(randomData(4 << 20, seed: 1200 + UInt64($0))) }
        for b in blobs { mustSh("cp \(shq(b.path)) \(shq(m.path(b.digest)))") }
        XCTAssertTrue(pollUntil(60) { ((try? m.stats())?["casfs_deferred_write_failures_total"] ?? 0) >= 3 })
        let edited = blobs[0]
        mustSh("printf 'X' | dd of=\(shq(entry(edited.digest))) bs=1 seek=1000 conv=notrunc status=none")
        let cat = sh("set -o pipefail; cat \(shq(m.path(edited.digest))) | sha256sum | cut -c1-64")
        if cat.ok { XCTAssertEqual(cat.stdout, edited.digest.hash + "\n", "the edited entry was served") }
        XCTAssertFalse(cat.ok, "the blob whose entry was edited was read without an error: \(cat)")
        r.cli("CONFIG SET maxmemory 0")
        XCTAssertTrue(pollUntil(120) { ((try? m.stats())?["casfs_deferred_writes_queued"] ?? 1) == 0 }, "the journal never drained")
        for b in blobs.dropFirst() { XCTAssertTrue(try indexed(b.digest)) }
        XCTAssertFalse(try indexed(edited.digest), "the edited entry reached the fallback")
        XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: storeDir, edited.digest)))
        XCTAssertEqual(aside("damaged").count, 1)
        XCTAssertEqual(try m.stats()["casfs_journal_damaged_entries_total"], 1)
        XCTAssertTrue(m.log.contains("journal entry of \(edited.digest) is damaged"), m.log)
    }

    /// Entries planted while no mount runs: a symbolic link to /etc/passwd
    /// named with its digest, and a file of zeros named with another blob's
    /// digest. The mount refuses both: never served, never sent.
    func testPlantedZerosAndSymlinkAreRefused() throws {
        let r = try startRedis()
        try FileManager.default.createDirectory(atPath: journal, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let passwd = Digest.of(try Data(contentsOf: URL(fileURLWithPath: "/etc/passwd")))
        XCTAssertEqual(symlink("/etc/passwd", entry(passwd)), 0)
        let other = Digest.of(randomData(70_000, seed: 1300))
        try Data(count: 70_000).write(to: URL(fileURLWithPath: entry(other)))
        let m = try mount(deferredIndexConfig(r, cacheSize: "64M"))
        XCTAssertTrue(pollUntil(60) { ((try? m.stats())?["casfs_journal_damaged_entries_total"] ?? 0) == 2 }, m.log)
        XCTAssertEqual(aside("damaged").count, 2)
        for d in [passwd, other] {
            XCTAssertFalse(sh("cat \(shq(m.path(d))) > /dev/null").ok, "\(d) was served")
            XCTAssertFalse(try indexed(d), "\(d) reached the fallback")
        }
        XCTAssertEqual(objects(), [])
        XCTAssertTrue(m.log.contains("a symbolic link (never followed)"), m.log)
    }

    /// A journal directory others may write to, or another user's, stops the
    /// mount with one line saying why; nothing is mounted.
    func testUnsafeJournalDirectoryRefusesTheMount() throws {
        let r = try startRedis()
        let cfg = tmp + "/cmd.yaml"
        try deferredIndexConfig(r, cacheSize: "64M").write(toFile: cfg, atomically: true, encoding: .utf8)
        let mp = tmp + "/refused"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: journal, withIntermediateDirectories: true)
        for (prepare, expected) in [("chmod 0777", "is writable by group or others (mode 777)"),
                                    ("chmod 0700 \(shq(journal)) && chown 65534:65534", "is owned by uid 65534")] {
            mustSh("\(prepare) \(shq(journal))")
            let out = sh("\(shq(casfs)) mount --config \(shq(cfg)) --log-file \(shq(tmp + "/refused.log")) \(shq(mp))")
            XCTAssertFalse(out.ok, "mounted with an unsafe journal directory")
            XCTAssertFalse(isFuseMounted(mp))
            let lines = out.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, out.stderr)
            XCTAssertTrue(out.stderr.contains(expected) && out.stderr.contains(journal), out.stderr)
        }
    }

    func bgdConfig(_ bgd: BuildGridServer, cacheSize: String) -> String {
        """
        storage: !with-cache-storage
          cache: !lru-storage
            size: \(cacheSize)
          fallback: !remote-storage
            url: \(bgd.url)
            request-timeout: 5s
            retries: 0
          defer-fallback-writes: true
          journal: \(journal)
        mount:
          writable: true

        """
    }

    /// With a live BuildGrid (down while the entries are edited): an
    /// entry whose blob the memory cache still holds is replaced by that
    /// proven copy and reaches BuildGrid with the right bytes; one whose
    /// copy the cache dropped is moved aside and dropped. Neither is sent
    /// damaged, nor retried forever.
    func testDamagedEntriesWithABuildGridFallback() throws {
        let bgd = try BuildGridServer(directory: tmp + "/bgd")
        server = bgd
        let m = try mount(bgdConfig(bgd, cacheSize: "7M"))
        // Down, not stalled: no send can be half on its way when an entry is edited.
        bgd.kill9()
        let dropped = try localBlob(randomData(3 << 20, seed: 1400))
        let kept = try (1...2).map { try localBlob(randomData(3 << 20, seed: 1400 + UInt64($0))) }
        // The 7 MiB cache keeps the last two; the first is evicted.
        for b in [dropped] + kept { mustSh("timeout 300 cp \(shq(b.path)) \(shq(m.path(b.digest)))") }
        for b in [dropped, kept[0]] {
            mustSh("printf 'X' | dd of=\(shq(entry(b.digest))) bs=1 seek=5000 conv=notrunc status=none")
        }
        try bgd.start()
        XCTAssertTrue(pollUntil(300) { ((try? m.stats())?["casfs_deferred_writes_queued"] ?? 1) == 0 }, "the journal never drained: \(m.log)")
        let missing = try bgd.client(["missing", dropped.digest.description] + kept.map(\.digest.description))
        XCTAssertEqual(missing.status, 0, missing.stderr)
        XCTAssertEqual(missing.stdout, dropped.digest.description + "\n", "BuildGrid should lack only the dropped blob")
        for b in kept {
            let out = "\(tmp)/bg-\(b.digest.hash.prefix(8))"
            XCTAssertEqual(try bgd.client(["read", b.digest.description, out]).status, 0)
            XCTAssertEqual(try sha256OfFile(out), b.digest.hash, "BuildGrid holds other bytes for \(b.digest)")
        }
        let s = try m.stats()
        XCTAssertEqual(s["casfs_journal_damaged_entries_total"], 2)
        let failures = s["casfs_deferred_write_failures_total"] ?? 0
        sleep(3)
        XCTAssertEqual(try m.stats()["casfs_deferred_write_failures_total"] ?? 0, failures, "sends are still being retried")
        XCTAssertTrue(m.log.contains("replaced with the cache's proven copy"), m.log)
        XCTAssertTrue(m.log.contains("deferred write of \(dropped.digest) dropped"), m.log)
    }
}
