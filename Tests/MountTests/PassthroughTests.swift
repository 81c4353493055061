import CASCore
import Foundation
import TestSupport
import XCTest

/// FUSE passthrough: reads of a verified local blob of 1 MiB or more are
/// done by the kernel from the store's file, never by the daemon; where the
/// daemon may not register backing files (not root), it serves them itself.
final class PassthroughTests: MountTestCase {
    private func diskConfig(_ store: String) -> String {
        """
        storage: !disk-storage
          path: \(store)
        mount:
          writable: true

        """
    }

    /// Bytes the daemon answered READs with, and passthrough opens so far.
    private func served(_ m: CasfsMount) throws -> (bytes: Int64, opens: Int64) {
        let s = try m.stats()
        return (s["casfs_read_bytes_total"] ?? 0, s["casfs_passthrough_opens_total"] ?? 0)
    }

    private func sha(_ path: String) -> String {
        String(mustSh("sha256sum \(shq(path))").prefix(64))
    }

    func testPassthroughReadsNeverReachTheDaemon() throws {
        let m = try mount(diskConfig(storeDir))
        let big = try localBlob(randomData(8 << 20, seed: 41))
        let small = try localBlob(randomData(64 << 10, seed: 42))
        mustSh("cp \(shq(big.path)) \(shq(m.path(big.digest))) && cp \(shq(small.path)) \(shq(m.path(small.digest)))")
        // A fresh mount: nothing of either blob is in its page cache.
        m.unmount()
        try m.mount()
        let before = try served(m)
        XCTAssertEqual(sha(m.path(big.digest)), big.digest.hash)
        mustSh("dd if=\(shq(m.path(big.digest))) of=/dev/null bs=4M status=none")
        mustSh("dd if=\(shq(m.path(big.digest))) of=/dev/null bs=4k skip=1000 count=7 status=none")
        let after = try served(m)
        XCTAssertEqual(after.bytes, before.bytes, "reads of a passthrough-open blob reached the daemon")
        XCTAssertGreaterThanOrEqual(after.opens - before.opens, 3, "the big blob was not opened through passthrough")

        // A blob under 1 MiB is served by the daemon (and cached by the kernel).
        XCTAssertEqual(sha(m.path(small.digest)), small.digest.hash)
        let afterSmall = try served(m)
        XCTAssertEqual(afterSmall.bytes - after.bytes, Int64(small.digest.size))
        XCTAssertEqual(afterSmall.opens, after.opens)

        // With passthrough=off the daemon serves every byte.
        m.unmount()
        try m.mount(extraOptions: ["passthrough=off"])
        let off0 = try served(m)
        XCTAssertEqual(sha(m.path(big.digest)), big.digest.hash)
        let off1 = try served(m)
        XCTAssertEqual(off1.bytes - off0.bytes, Int64(big.digest.size))
        XCTAssertEqual(off1.opens, off0.opens)
    }

    /// A store on overlayfs (a container's root) needs a deeper stack; the
    /// mount asks for it, and passthrough works there too.
    func testStoreOnOverlayfsIsPassedThrough() throws {
        let o = tmp + "/overlay"
        for d in ["lower", "upper", "work", "merged"] {
            try FileManager.default.createDirectory(atPath: o + "/" + d, withIntermediateDirectories: true)
        }
        mustSh("mount -t overlay overlay -o lowerdir=\(o)/lower,upperdir=\(o)/upper,workdir=\(o)/work \(o)/merged")
        defer { runShell("umount \(shq(o + "/merged")) || umount -l \(shq(o + "/merged"))") }
        XCTAssertEqual(mustSh("stat -f -c %t \(shq(o + "/merged"))").trimmingCharacters(in: .whitespacesAndNewlines), "794c7630")
        let m = try mount(diskConfig(o + "/merged/store"))
        defer { m.unmount() }
        let big = try localBlob(randomData(3 << 20, seed: 43))
        mustSh("cp \(shq(big.path)) \(shq(m.path(big.digest)))")
        m.unmount()
        try m.mount()
        let before = try served(m)
        XCTAssertEqual(sha(m.path(big.digest)), big.digest.hash)
        let after = try served(m)
        XCTAssertEqual(after.bytes, before.bytes, "the daemon served a blob stored on overlayfs")
        XCTAssertGreaterThan(after.opens, before.opens, "no passthrough open for a blob stored on overlayfs")
        XCTAssertFalse(m.log.contains("passthrough of a blob file failed"), m.log)
    }

    /// A mount by an unprivileged user cannot register backing files: it
    /// says so once and reads every blob correctly through the daemon.
    func testUnprivilegedMountReadsWithoutPassthrough() throws {
        let bin = try casfsBinary()
        let home = tmp + "/nobody"
        let mp = home + "/mnt"
        let store = home + "/store"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        try diskConfig(store).write(toFile: home + "/cas.yaml", atomically: true, encoding: .utf8)
        let big = try localBlob(randomData(5 << 20, seed: 44))
        mustSh("cp \(shq(big.path)) \(shq(home + "/blob"))")
        mustSh("chown -R nobody: \(shq(home)) && chmod 755 \(shq(tmp))")
        // This machine keeps /dev/fuse for root; open it to others for the test.
        let mode = mustSh("stat -c %a /dev/fuse").trimmingCharacters(in: .whitespacesAndNewlines)
        mustSh("chmod 666 /dev/fuse")
        defer { runShell("chmod \(mode) /dev/fuse") }
        let asNobody = "cd / && setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=\(shq(home)) XDG_DATA_HOME=\(shq(home + "/xdg"))"
        defer { if isFuseMounted(mp) { runShell("fusermount3 -u \(shq(mp)) || umount -l \(shq(mp))") } }
        mustSh("\(asNobody) \(shq(bin)) mount --config \(shq(home + "/cas.yaml")) --staging-dir \(shq(home + "/staging")) --log-file \(shq(home + "/log")) \(shq(mp))")
        XCTAssertTrue(isFuseMounted(mp))
        let path = "\(mp)/sha256/\(big.digest)"
        mustSh("\(asNobody) cp \(shq(home + "/blob")) \(shq(path))")
        XCTAssertEqual(String(mustSh("\(asNobody) sha256sum \(shq(path))").prefix(64)), big.digest.hash)
        XCTAssertEqual(mustSh("\(asNobody) dd if=\(shq(path)) bs=4k skip=300 count=2 status=none | sha256sum").prefix(64),
                       mustSh("dd if=\(shq(big.path)) bs=4k skip=300 count=2 status=none | sha256sum").prefix(64))
        let stats = mustSh("\(asNobody) getfattr --only-values -n user.casfs.stats \(shq(mp))")
        let obj = try JSONSerialization.jsonObject(with: Data(stats.utf8)) as? [String: Any] ?? [:]
        let opens = obj.filter { $0.key.hasPrefix("casfs_passthrough_opens_total") }.compactMap { ($0.value as? NSNumber)?.int64Value }.reduce(0, +)
        let bytes = obj.filter { $0.key.hasPrefix("casfs_read_bytes_total") }.compactMap { ($0.value as? NSNumber)?.int64Value }.reduce(0, +)
        XCTAssertEqual(opens, 0)
        XCTAssertGreaterThanOrEqual(bytes, Int64(big.digest.size), "the daemon did not serve the reads")
        mustSh("\(asNobody) fusermount3 -u \(shq(mp))")
        XCTAssertTrue(pollUntil(15) { !self.sh("pgrep -u nobody -f \(shq(home))").ok })
        let log = (try? String(contentsOfFile: home + "/log", encoding: .utf8)) ?? ""
        XCTAssertTrue(log.contains("passthrough"), log)
    }
}
