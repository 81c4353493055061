import CASCore
import Foundation
import TestSupport
import XCTest

/// An ext4 filesystem in a file, loop-mounted: damage can be done to the
/// medium under it (a block of the image overwritten), which changes no
/// metadata the filesystem shows, as bit rot or a bad controller would.
final class LoopFilesystem {
    let image: String
    let mountpoint: String

    init(directory: String, sizeMiB: Int = 96) throws {
        image = directory + "/ext4.img"
        mountpoint = directory + "/fs"
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        for tool in ["mkfs.ext4", "debugfs", "losetup"] where !runShell("command -v \(tool)").ok {
            throw MountError("\(tool) is not installed: media damage tests need it (apt-get install e2fsprogs mount)")
        }
        let r = runShell("truncate -s \(sizeMiB)M \(shq(image)) && mkfs.ext4 -q -F -b 4096 \(shq(image))")
        guard r.ok else { throw MountError("mkfs.ext4: \(r)") }
        try mount()
    }

    var isMounted: Bool { runShell("mountpoint -q \(shq(mountpoint))").ok }

    func mount() throws {
        let r = runShell("mount -o loop \(shq(image)) \(shq(mountpoint))")
        guard r.ok else { throw MountError("mount -o loop (tests need root and loop devices): \(r)") }
    }

    /// Unmounting drops every cached page and inode of the filesystem: the
    /// next mount reads from the medium, as after a reboot.
    func unmount() {
        if isMounted { runShell("umount \(shq(mountpoint)) || umount -l \(shq(mountpoint))") }
    }

    /// Overwrites the 1 KiB block at `offset` (a multiple of 1024) of the
    /// file at `path` (under the mount point) in the image, with the
    /// filesystem unmounted; the file's metadata stays as it was.
    func damage(_ path: String, at offset: Int64) throws {
        precondition(path.hasPrefix(mountpoint + "/") && offset % 1024 == 0)
        let inside = String(path.dropFirst(mountpoint.count))
        unmount()
        defer { try? mount() }
        let bmap = runShell("debugfs -R \(shq("bmap \(inside) \(offset / 4096)")) \(shq(image)) 2>/dev/null")
        guard bmap.ok, let block = Int64(bmap.stdout.trimmingCharacters(in: .whitespacesAndNewlines)), block > 0 else {
            throw MountError("debugfs bmap of \(inside): \(bmap)")
        }
        let kib = block * 4 + (offset % 4096) / 1024
        let before = runShell("dd if=\(shq(image)) bs=1024 skip=\(kib) count=1 status=none | sha256sum").stdout
        let w = runShell("head -c 1024 /dev/urandom | dd of=\(shq(image)) bs=1024 seek=\(kib) count=1 conv=notrunc status=none")
        guard w.ok else { throw MountError("damaging the image: \(w)") }
        let after = runShell("dd if=\(shq(image)) bs=1024 skip=\(kib) count=1 status=none | sha256sum").stdout
        guard before != after else { throw MountError("the damaged block did not change") }
    }

    deinit { unmount() }
}

/// Damage a proof cannot see, and the ways it is found and repaired: a
/// change that puts the modification time back voids the proof (it binds
/// the change time); media damage is found by `casfs scrub` (by hand or in
/// the background of a mount) and by a verified rewrite of the blob.
final class MediaDamageTests: MountTestCase {
    var loop: LoopFilesystem?
    var casfs: String { (try? casfsBinary()) ?? "casfs" }

    override func tearDown() {
        for m in mounts { m.unmount() }
        mounts = []
        loop?.unmount()
        loop = nil
        super.tearDown()
    }

    func configFile(_ config: String, name: String = "cmd.yaml") throws -> String {
        let p = tmp + "/" + name
        try config.write(toFile: p, atomically: true, encoding: .utf8)
        return p
    }

    func makeLoop() throws -> LoopFilesystem {
        let l = try LoopFilesystem(directory: tmp + "/loop")
        loop = l
        return l
    }

    func proofRecord(_ store: String, _ d: Digest) -> String {
        "\(store)/casfs-proofs/\(d.hash.prefix(2))/\(d.hash.dropFirst(2))"
    }

    /// `cat | sha256sum` of a mounted blob: never exit 0 with wrong bytes.
    /// Returns whether it succeeded.
    @discardableResult
    func checkedRead(_ m: CasfsMount, _ d: Digest, _ what: String, file: StaticString = #filePath, line: UInt = #line) -> Bool {
        let r = runShell("set -o pipefail; timeout 300 cat \(shq(m.path(d))) | sha256sum | cut -c1-64")
        if r.ok {
            XCTAssertEqual(r.stdout, d.hash + "\n", "\(what): cat exited 0 with wrong bytes", file: file, line: line)
        }
        return r.ok
    }

    /// `dd conv=notrunc` changes a byte of a proven 4 MiB store object and
    /// `touch -r` puts its modification time back: the proof is void, so
    /// the next mount checks it and never serves the wrong bytes, with and
    /// without passthrough. A proof that nothing voided holds across the
    /// remount (no hashing, passthrough opens).
    func testProofDoesNotSurviveAChangeThatRestoresMtime() throws {
        for options in [[String](), ["passthrough=off"]] {
            let what = options.isEmpty ? "passthrough=auto" : "passthrough=off"
            let m = try mount(try indexedDiskConfig(), name: options.isEmpty ? "auto" : "off")
            let damaged = try localBlob(randomData(4 << 20, seed: options.isEmpty ? 1 : 2))
            let intact = try localBlob(randomData(4 << 20, seed: options.isEmpty ? 3 : 4))
            for b in [damaged, intact] { mustSh("cp \(shq(b.path)) \(shq(m.path(b.digest)))") }
            m.unmount()
            for b in [damaged, intact] {
                XCTAssertNotNil(try? FileManager.default.destinationOfSymbolicLink(atPath: proofRecord(storeDir, b.digest)),
                                "\(what): no proof record")
            }
            let object = diskObjectPath(root: storeDir, damaged.digest)
            let mtime = mustSh("stat -c %y \(shq(object))")
            mustSh("touch -r \(shq(object)) \(shq(tmp + "/ref")) && printf '\\x5a\\xa5' | dd of=\(shq(object)) bs=1 seek=2000000 conv=notrunc status=none && touch -r \(shq(tmp + "/ref")) \(shq(object))")
            XCTAssertEqual(mustSh("stat -c %y \(shq(object))"), mtime, "\(what): the modification time was not put back")
            XCTAssertNotEqual(try sha256OfFile(object), damaged.digest.hash, "\(what): the object was not changed")
            try m.mount(extraOptions: options)
            let before = try m.stats()
            XCTAssertFalse(checkedRead(m, damaged.digest, what), "\(what): the damaged blob was read without error")
            let after = try m.stats()
            XCTAssertGreaterThan(after["casfs_verify_failures_total"] ?? 0, before["casfs_verify_failures_total"] ?? 0,
                                 "\(what): the damage was not detected")
            // The intact blob's proof held: served without hashing.
            XCTAssertTrue(checkedRead(m, intact.digest, what))
            let last = try m.stats()
            XCTAssertEqual(last["casfs_verified_bytes_total"], after["casfs_verified_bytes_total"], "\(what): a proven blob was hashed again")
            if options.isEmpty {
                XCTAssertGreaterThan(last["casfs_passthrough_opens_total"] ?? 0, 0, "the proven blob was not read through passthrough")
            }
            m.unmount()
        }
    }

    /// Proofs outlive the filesystem's caches: the store's filesystem is
    /// unmounted and mounted again (as a reboot would), and a proven 4 MiB
    /// blob is served without hashing, through passthrough.
    func testProofHoldsAcrossARemountOfTheStoreFilesystem() throws {
        let l = try makeLoop()
        let store = l.mountpoint + "/store"
        let config = indexedDiskConfig(port: try startRedis().port, store: store)
        let m = try mount(config)
        let b = try localBlob(randomData(4 << 20, seed: 10))
        mustSh("cp \(shq(b.path)) \(shq(m.path(b.digest)))")
        m.unmount()
        l.unmount()
        try l.mount()
        try m.mount()
        let before = try m.stats()
        XCTAssertTrue(checkedRead(m, b.digest, "after a remount"))
        let after = try m.stats()
        XCTAssertEqual(after["casfs_verified_bytes_total"], before["casfs_verified_bytes_total"], "the proof did not hold")
        XCTAssertGreaterThan(after["casfs_passthrough_opens_total"] ?? 0, before["casfs_passthrough_opens_total"] ?? 0)
    }

    /// Stores three 4 MiB blobs through a mount on `store`, damages 1 KiB of
    /// the first one's object on the medium, and returns them.
    func storeAndDamage(_ l: LoopFilesystem, config: String, store: String) throws -> [(path: String, digest: Digest)] {
        let m = try mount(config, name: "writer")
        let blobs = try (0..<3).map { try localBlob(randomData(4 << 20, seed: 20 + UInt64($0))) }
        for b in blobs { mustSh("cp \(shq(b.path)) \(shq(m.path(b.digest)))") }
        m.unmount()
        mounts.removeAll { $0 === m }
        let object = diskObjectPath(root: store, blobs[0].digest)
        let stampBefore = mustSh("stat -c '%i %s %y %z' \(shq(object))")
        try l.damage(object, at: 10240)
        XCTAssertEqual(mustSh("stat -c '%i %s %y %z' \(shq(object))"), stampBefore, "the damage changed metadata")
        XCTAssertNotEqual(try sha256OfFile(object), blobs[0].digest.hash, "the object's bytes did not change")
        // cmp counts from 1: the first difference lies in the damaged KiB.
        let cmp = sh("cmp \(shq(object)) \(shq(blobs[0].path)) | sed -n 's/.*byte \\([0-9]*\\).*/\\1/p'")
        let first = Int(cmp.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        XCTAssertTrue((10241...11264).contains(first), "the damage is not where it was put: \(cmp)")
        return blobs
    }

    /// 1 KiB of a store object overwritten on the medium (no metadata
    /// changes, so its proof still holds): `casfs scrub` finds it, removes
    /// it from the store and the index (total_size follows), reports it and
    /// exits 1; the next scrub finds nothing and exits 0.
    func testScrubFindsAndRemovesMediaDamage() throws {
        let l = try makeLoop()
        let store = l.mountpoint + "/store"
        let r = try startRedis()
        let config = indexedDiskConfig(port: r.port, store: store)
        let blobs = try storeAndDamage(l, config: config, store: store)
        let cfg = try configFile(config)
        let scrub = sh("\(shq(casfs)) scrub --config \(shq(cfg)) --rate 0")
        XCTAssertEqual(scrub.status, 1, "\(scrub)")
        XCTAssertTrue(scrub.stdout.contains("damaged: sha256/\(blobs[0].digest)"), scrub.stdout)
        XCTAssertTrue(scrub.stdout.contains("removed from the store and its index"), scrub.stdout)
        XCTAssertTrue(scrub.stdout.contains("3 files checked"), scrub.stdout)
        for b in blobs.dropFirst() { XCTAssertFalse(scrub.stdout.contains(b.digest.hash), "an intact blob was reported") }
        XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: store, blobs[0].digest)))
        XCTAssertFalse(try indexed(blobs[0].digest))
        for b in blobs.dropFirst() { XCTAssertTrue(try indexed(b.digest)) }
        XCTAssertEqual(r.cli("GET total_size"), "\(8 << 20)\n")
        let again = sh("\(shq(casfs)) scrub --config \(shq(cfg)) --rate 0")
        XCTAssertEqual(again.status, 0, "\(again)")
        XCTAssertTrue(again.stdout.contains("2 files checked"), again.stdout)
        XCTAssertTrue(again.stdout.contains("0 damaged"), again.stdout)
        let m = try mount(config)
        let cat = sh("cat \(shq(m.path(blobs[0].digest))) > /dev/null")
        XCTAssertTrue(cat.stderr.contains("No such file or directory"), "the removed blob: \(cat)")
        for b in blobs.dropFirst() { XCTAssertTrue(checkedRead(m, b.digest, "intact blob")) }
    }

    /// `--dry-run` reports the damage (exit 1) and changes nothing.
    func testScrubDryRunChangesNothing() throws {
        let l = try makeLoop()
        let store = l.mountpoint + "/store"
        let config = indexedDiskConfig(port: try startRedis().port, store: store)
        let blobs = try storeAndDamage(l, config: config, store: store)
        let scrub = sh("\(shq(casfs)) scrub --config \(shq(try configFile(config))) --rate 0 --dry-run")
        XCTAssertEqual(scrub.status, 1, "\(scrub)")
        XCTAssertTrue(scrub.stdout.contains("damaged: sha256/\(blobs[0].digest)"), scrub.stdout)
        XCTAssertTrue(scrub.stdout.contains("left as it is (dry run)"), scrub.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: diskObjectPath(root: store, blobs[0].digest)))
        XCTAssertTrue(try indexed(blobs[0].digest))
        XCTAssertFalse(FileManager.default.fileExists(atPath: store + "/scrub.state"), "a dry run keeps no cursor")
    }

    /// A disk cache in front of an indexed disk store: the cache's damaged
    /// copy is repaired from the fallback by `casfs scrub --mount`, beside
    /// the running mount, which then serves the right bytes.
    func testScrubByMountRepairsFromTheFallback() throws {
        let l = try makeLoop()
        let cache = l.mountpoint + "/cache"
        let r = try startRedis()
        let config = """
            storage: !with-cache-storage
              cache: !disk-storage
                path: \(cache)
              fallback: !redis-index
                redis: !redis-connection
                  host: 127.0.0.1
                  port: \(r.port)
                storage: !disk-storage
                  path: \(storeDir)
            mount:
              writable: true

            """
        let blobs = try storeAndDamage(l, config: config, store: cache)
        let m = try mount(config)
        let scrub = sh("\(shq(casfs)) scrub --mount \(shq(m.mountpoint)) --rate 0")
        XCTAssertEqual(scrub.status, 1, "\(scrub)")
        XCTAssertTrue(scrub.stdout.contains("damaged: sha256/\(blobs[0].digest) in storage.cache"), scrub.stdout)
        XCTAssertTrue(scrub.stdout.contains("repaired from storage.fallback"), scrub.stdout)
        XCTAssertEqual(try sha256OfFile(diskObjectPath(root: cache, blobs[0].digest)), blobs[0].digest.hash)
        for b in blobs { XCTAssertTrue(checkedRead(m, b.digest, "after the repair")) }
        XCTAssertEqual(sh("\(shq(casfs)) scrub --mount \(shq(m.mountpoint)) --rate 0").status, 0)
    }

    /// Media damage under a valid proof, then `cp` of the right bytes
    /// through the mount: the write is verified, finds the stored copy
    /// different and replaces it.
    func testVerifiedRewriteRepairsMediaDamage() throws {
        let l = try makeLoop()
        let store = l.mountpoint + "/store"
        let config = indexedDiskConfig(port: try startRedis().port, store: store)
        let blobs = try storeAndDamage(l, config: config, store: store)
        let m = try mount(config)
        mustSh("cp \(shq(blobs[0].path)) \(shq(m.path(blobs[0].digest)))")
        XCTAssertEqual(try sha256OfFile(diskObjectPath(root: store, blobs[0].digest)), blobs[0].digest.hash,
                       "the damaged copy is still in the store")
        XCTAssertEqual(try m.stats()["casfs_damaged_copies_replaced_total"], 1)
        // An intact copy is left alone by a rewrite.
        let inode = mustSh("stat -c %i \(shq(diskObjectPath(root: store, blobs[1].digest)))")
        mustSh("cp \(shq(blobs[1].path)) \(shq(m.path(blobs[1].digest)))")
        XCTAssertEqual(mustSh("stat -c %i \(shq(diskObjectPath(root: store, blobs[1].digest)))"), inode)
        m.unmount()
        try m.mount()
        for b in blobs { XCTAssertTrue(checkedRead(m, b.digest, "after the rewrite")) }
    }

    /// Places `count` blobs of `size` bytes straight into a plain disk
    /// store and returns them sorted by hash (scrub's order).
    func placeBlobs(_ count: Int, size: Int, seed: UInt64) throws -> [Digest] {
        try (0..<count).map { try placeInDiskStore(randomData(size, seed: seed &+ UInt64($0))) }.sorted()
    }

    var diskOnlyConfig: String {
        """
        storage: !disk-storage
          path: \(storeDir)
        mount:
          writable: false

        """
    }

    func scrubState() throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: storeDir + "/scrub.state"))
        return try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    /// A scrub killed with SIGKILL resumes after its cursor: the second run
    /// checks only the objects after it, and the pass counts each once.
    func testScrubResumesFromItsCursorAfterBeingKilled() throws {
        let digests = try placeBlobs(40, size: 256 << 10, seed: 300)
        try flipByte(path: diskObjectPath(root: storeDir, digests.last!), at: 1000)
        let cfg = try configFile(diskOnlyConfig)
        let p = try startLoggedProcess(casfs, ["scrub", "--config", cfg, "--rate", "1"], log: tmp + "/scrub1.log")
        let progressed = pollUntil(120) { ((try? self.scrubState())?["passObjects"] as? Int ?? 0) >= 4 }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        XCTAssertTrue(progressed, "the first scrub made no progress")
        let state = try scrubState()
        let cursor = try XCTUnwrap(state["cursor"] as? String)
        let done = try XCTUnwrap(state["passObjects"] as? Int)
        XCTAssertLessThan(done, 40, "the first scrub finished before it was killed")
        XCTAssertEqual(digests.filter { $0.hash <= cursor }.count, done, "the cursor and the count disagree")
        let second = sh("\(shq(casfs)) scrub --config \(shq(cfg)) --rate 0")
        XCTAssertEqual(second.status, 1, "\(second)")
        XCTAssertTrue(second.stdout.contains("\(40 - done) files checked"), second.stdout)
        XCTAssertTrue(second.stdout.contains("resumed after \(cursor.prefix(12))"), second.stdout)
        XCTAssertTrue(second.stdout.contains("damaged: sha256/\(digests.last!)"), second.stdout)
        let final = try scrubState()
        XCTAssertNil(final["cursor"], "the pass is complete")
        XCTAssertEqual(final["lastPassObjects"] as? Int, 40)
        XCTAssertEqual(final["lastPassDamaged"] as? Int, 1)
    }

    /// `--rate` bounds what a scrub reads: stopped after a while, it has
    /// checked no more than the rate allows for the time it ran (plus one
    /// 1 MiB read), measured from its own cursor.
    func testRateBoundsTheBytesChecked() throws {
        _ = try placeBlobs(24, size: 1 << 20, seed: 400)
        let cfg = try configFile(diskOnlyConfig)
        let start = Date()
        let p = try startLoggedProcess(casfs, ["scrub", "--config", cfg, "--rate", "2"], log: tmp + "/scrub.log")
        XCTAssertTrue(pollUntil(60) { ((try? self.scrubState())?["passBytes"] as? Int ?? 0) > 0 }, "no progress")
        sleep(2)
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        let elapsed = Date().timeIntervalSince(start)
        let state = try scrubState()
        let bytes = try XCTUnwrap(state["passBytes"] as? Int)
        XCTAssertGreaterThan(bytes, 0)
        XCTAssertLessThanOrEqual(Double(bytes), 2 * Double(1 << 20) * elapsed + Double(1 << 20),
                                 "\(bytes) bytes checked in \(elapsed) s at --rate 2")
        XCTAssertEqual(p.terminationStatus, 2, "a stopped scrub exits 2")
        XCTAssertNotNil(state["cursor"], "the stopped pass keeps its cursor")
    }

    /// `scrub-interval` makes a mount scrub its stores in the background:
    /// a damaged copy in its disk cache is repaired from the fallback, and
    /// the casfs_scrub_* metrics show the pass and the repair.
    func testBackgroundScrubOnAMountRepairsAndCounts() throws {
        let r = try startRedis()
        let cache = tmp + "/cache"
        func config(_ scrub: Bool) -> String {
            """
            storage: !with-cache-storage
              cache: !disk-storage
                path: \(cache)
              fallback: !redis-index
                redis: !redis-connection
                  host: 127.0.0.1
                  port: \(r.port)
                storage: !disk-storage
                  path: \(storeDir)
            mount:
              writable: true
            \(scrub ? "  scrub-interval: 1h\n  scrub-rate: 0" : "")

            """
        }
        let w = try mount(config(false), name: "w")
        let blobs = try (0..<3).map { try localBlob(randomData(1 << 20, seed: 500 + UInt64($0))) }
        for b in blobs { mustSh("cp \(shq(b.path)) \(shq(w.path(b.digest)))") }
        w.unmount()
        try flipByte(path: diskObjectPath(root: cache, blobs[1].digest), at: 4242)
        let m = try mount(config(true), name: "m")
        XCTAssertTrue(pollUntil(120) { ((try? m.stats())?["casfs_scrub_passes_total"] ?? 0) >= 2 }, "no scrub passes: \(m.log)")
        let s = try m.stats()
        XCTAssertEqual(s["casfs_scrub_damaged_total"], 1)
        XCTAssertEqual(s["casfs_scrub_repaired_total"], 1)
        XCTAssertEqual(s["casfs_scrub_removed_total"] ?? 0, 0)
        XCTAssertEqual(s["casfs_scrub_objects_checked_total"], 6, "3 blobs in the cache and 3 in the store")
        XCTAssertGreaterThanOrEqual(s["casfs_scrub_bytes_checked_total"] ?? 0, 6 << 20)
        XCTAssertGreaterThan(s["casfs_scrub_last_pass_end_timestamp_seconds"] ?? 0, 1_700_000_000)
        XCTAssertGreaterThan(s["casfs_scrub_last_pass_start_timestamp_seconds"] ?? 0, 1_700_000_000)
        XCTAssertEqual(try sha256OfFile(diskObjectPath(root: cache, blobs[1].digest)), blobs[1].digest.hash)
        for b in blobs { XCTAssertTrue(checkedRead(m, b.digest, "after the background repair")) }
        XCTAssertTrue(m.log.contains("scrub: damaged \(blobs[1].digest)"), m.log)
    }

    /// Scrub passes beside a mount that writes and deletes blobs all the
    /// while: nothing is judged damaged, nothing is left unindexed.
    func testScrubBesideWritesAndDeletesFindsNothing() throws {
        let r = try startRedis()
        let config = try indexedDiskConfig()
        let cfg = try configFile(config)
        let m = try mount(config)
        let blobs = try (0..<60).map { try localBlob(randomData(64 << 10 + $0 * 4096, seed: 600 + UInt64($0))) }
        let writer = DispatchQueue(label: "writer")
        let done = DispatchSemaphore(value: 0)
        writer.async {
            for round in 0..<4 {
                for (i, b) in blobs.enumerated() {
                    runShell("cp \(shq(b.path)) \(shq(m.path(b.digest)))")
                    if (i + round) % 3 == 0 { runShell("rm -f \(shq(m.path(b.digest)))") }
                }
            }
            done.signal()
        }
        var runs = 0
        repeat {
            let s = sh("\(shq(casfs)) scrub --config \(shq(cfg)) --rate 0")
            XCTAssertEqual(s.status, 0, "scrub beside writes: \(s)")
            XCTAssertTrue(s.stdout.contains(" 0 damaged"), s.stdout)
            runs += 1
        } while done.wait(timeout: .now()) == .timedOut
        XCTAssertGreaterThanOrEqual(runs, 1)
        let reindex = sh("\(shq(casfs)) reindex --dry-run --config \(shq(cfg))")
        XCTAssertTrue(reindex.stdout.contains("would add 0 blobs"), "\(reindex)")
        XCTAssertTrue(reindex.stdout.contains("would drop 0 entries"), "\(reindex)")
        _ = r
    }

    /// The zero-config store: `casfs scrub --mount` on the zero-config mount,
    /// and `casfs scrub` with no arguments, work on `$XDG_DATA_HOME/casfs`;
    /// the damaged blob is removed from the store and the private index.
    func testScrubOfTheZeroConfigStore() throws {
        let mp = tmp + "/zc"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        defer { if isFuseMounted(mp) { _ = sh("fusermount3 -u \(shq(mp)) || fusermount3 -uz \(shq(mp))") } }
        let env = "XDG_DATA_HOME=\(shq(tmp + "/xdg"))"
        let store = tmp + "/xdg/casfs"
        mustSh("\(env) \(shq(casfs)) mount --log-file \(shq(tmp + "/zc.log")) \(shq(mp))")
        let blobs = try (0..<2).map { try localBlob(randomData(2 << 20, seed: 2100 + UInt64($0))) }
        for b in blobs { mustSh("cp \(shq(b.path)) \(shq(mp))/sha256/\(b.digest)") }
        try flipByte(path: diskObjectPath(root: store, blobs[0].digest), at: 77)
        let scrub = sh("\(env) \(shq(casfs)) scrub --mount \(shq(mp)) --rate 0")
        XCTAssertEqual(scrub.status, 1, "\(scrub)")
        XCTAssertTrue(scrub.stdout.contains("damaged: sha256/\(blobs[0].digest)"), scrub.stdout)
        XCTAssertTrue(scrub.stdout.contains("removed from the store and its index"), scrub.stdout)
        // Gone from the store and the index: no longer listed. The mount may
        // still hold the blob's verified bytes in its memory cache (written
        // through it): a read gets those or nothing, never the damaged ones.
        XCTAssertFalse(mustSh("ls \(shq(mp))/sha256").contains(blobs[0].digest.hash))
        let r = sh("set -o pipefail; sha256sum < \(shq(mp))/sha256/\(blobs[0].digest) | cut -c1-64")
        if r.ok { XCTAssertEqual(r.stdout, blobs[0].digest.hash + "\n", "a read of the scrubbed blob") }
        XCTAssertEqual(mustSh("sha256sum < \(shq(mp))/sha256/\(blobs[1].digest) | cut -c1-64"), blobs[1].digest.hash + "\n")
        let again = sh("\(env) \(shq(casfs)) scrub --rate 0")
        XCTAssertEqual(again.status, 0, "\(again)")
        XCTAssertTrue(again.stdout.contains("1 files checked"), again.stdout)
        mustSh("fusermount3 -u \(shq(mp))")
    }
}
