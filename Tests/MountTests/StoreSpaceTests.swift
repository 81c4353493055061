import CASCore
import Foundation
import TestSupport
import XCTest

/// `casfs put` of files whose size is not known up front, and what `df`
/// says about where blobs land.
final class StoreSpaceTests: MountTestCase {
    /// /proc files say size 0; put reads them to the end.
    func testPutOfAProcFileStoresWhatWasRead() throws {
        let m = try zeroConfigMount()
        let out = mustSh("\(m.env) \(shq(try casfsBinary())) put --quiet /proc/self/status")
        let fields = out.split(separator: " ", omittingEmptySubsequences: true)
        XCTAssertEqual(fields.count, 2, out)
        let name = try XCTUnwrap(fields.first.map(String.init))
        XCTAssertTrue(name.hasPrefix("sha256/"), out)
        let d = try Digest.parse(name.dropFirst(7))
        XCTAssertGreaterThan(d.size, 100, "put stored \(d.size) bytes of /proc/self/status")
        let bytes = try XCTUnwrap(contents(m.path(d)))
        XCTAssertEqual(Digest.of(bytes), d)
        let text = String(decoding: bytes, as: UTF8.self)
        XCTAssertTrue(text.hasPrefix("Name:\tcasfs"), text)
        XCTAssertTrue(text.contains("\nPid:\t"), text)
        // A config stack too, and several /proc files at once.
        let cfg = try mount(try cachedIndexedConfig())
        let many = mustSh("\(shq(try casfsBinary())) put --quiet --config \(shq(cfg.configPath)) /proc/self/status /proc/self/limits /proc/version")
        let digests = try many.split(separator: "\n").map { try Digest.parse($0.split(separator: " ")[0].dropFirst(7)) }
        XCTAssertEqual(digests.count, 3, many)
        for d in digests {
            XCTAssertGreaterThan(d.size, 0)
            XCTAssertEqual(Digest.of(try XCTUnwrap(contents(cfg.path(d)))), d)
        }
        XCTAssertEqual(contents(cfg.path(digests[2])), contents("/proc/version"))
    }

    /// Parses `stat -f` of `path`: block size, total, free, available, files, free files.
    func statfs(_ path: String) throws -> (bsize: UInt64, blocks: UInt64, free: UInt64, avail: UInt64, files: UInt64, ffree: UInt64) {
        let v = mustSh("stat -f -c '%S %b %f %a %c %d' \(shq(path))").split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { UInt64($0) }
        guard v.count == 6 else { throw MountError("stat -f \(path): \(v)") }
        return (v[0], v[1], v[2], v[3], v[4], v[5])
    }

    /// The store on a small filesystem of its own, staging elsewhere: df
    /// of the mount shows the store's free space, not the staging directory's.
    func testFreeSpaceIsTheStoresNotTheStagingDirectorys() throws {
        let small = tmp + "/small"
        try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
        mustSh("mount -t tmpfs -o size=48m,nr_inodes=4096 casfs-test-store \(shq(small))")
        defer { runShell("umount -l \(shq(small))") }
        let config = indexedDiskConfig(port: try startRedis().port, store: small + "/store")
        let m = try mount(config)
        let (src, d) = try localBlob(randomData(5 << 20, seed: 51))
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        XCTAssertTrue(FileManager.default.fileExists(atPath: diskObjectPath(root: small + "/store", d)))
        let store = try statfs(small)
        let staging = try statfs(m.stagingDir)
        let mnt = try statfs(m.mountpoint)
        XCTAssertNotEqual(store.blocks * store.bsize, staging.blocks * staging.bsize, "the test needs two different filesystems")
        let storeFree = store.avail * store.bsize
        let shownFree = mnt.avail * mnt.bsize
        // Free space: the store's (it changes as others write there; compare loosely).
        XCTAssertLessThanOrEqual(shownFree, 48 << 20, "df shows \(shownFree) bytes free: the staging directory's, not the store's")
        XCTAssertGreaterThan(shownFree, 0)
        // Within 1 MiB: the daemon itself may write to the store (proofs) between the two readings.
        XCTAssertLessThanOrEqual(max(shownFree, storeFree) - min(shownFree, storeFree), 1 << 20,
                                 "free bytes: mount \(shownFree), store \(storeFree)")
        // Used: the index's total; not 100% used.
        XCTAssertEqual((mnt.blocks - mnt.free) * mnt.bsize, UInt64((d.size + 4095) / 4096 * 4096))
        let pcent = mustSh("df --output=pcent \(shq(m.mountpoint)) | tail -1").trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertNotEqual(pcent, "100%")
        // Files: the store filesystem's free inodes; not 100% used.
        XCTAssertLessThanOrEqual(mnt.ffree, 4096)
        XCTAssertGreaterThan(mnt.ffree, 0)
        let ipcent = mustSh("df -i --output=ipcent \(shq(m.mountpoint)) | tail -1").trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertNotEqual(ipcent, "100%")
    }

    /// The zero-config stack: free space and files are not 100% used.
    func testZeroConfigDfIsNotFull() throws {
        let m = try zeroConfigMount()
        let (src, d) = try localBlob(randomData(1 << 20, seed: 52))
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        // The data directory's disk is shared (others write to it between the
        // statfs calls): the mount's free space lies between two readings of
        // the disk's, within a tolerance of 2% of the disk (at least 1 GiB).
        let before = try statfs(m.dataDirectory)
        let mnt = try statfs(m.mountpoint)
        let after = try statfs(m.dataDirectory)
        XCTAssertGreaterThan(mnt.avail, 0)
        let shown = mnt.avail * mnt.bsize
        let low = min(before.avail * before.bsize, after.avail * after.bsize)
        let high = max(before.avail * before.bsize, after.avail * after.bsize)
        let tolerance = max(UInt64(1 << 30), before.blocks * before.bsize / 50)
        XCTAssertGreaterThanOrEqual(shown + tolerance, low, "df of the mount: \(shown) bytes free; the data directory's disk: \(low)…\(high)")
        XCTAssertLessThanOrEqual(shown, high + tolerance, "df of the mount: \(shown) bytes free; the data directory's disk: \(low)…\(high)")
        // Not another filesystem's figure: the mount's size is the disk's (plus what the index counts as used).
        XCTAssertLessThanOrEqual(mnt.blocks * mnt.bsize, before.blocks * before.bsize + tolerance)
        XCTAssertGreaterThan(mnt.ffree, 0)
        XCTAssertEqual(mnt.files - mnt.ffree, 1, "one blob")
        for flag in ["", "-i"] {
            let p = mustSh("df \(flag) --output=\(flag.isEmpty ? "pcent" : "ipcent") \(shq(m.mountpoint)) | tail -1").trimmingCharacters(in: .whitespacesAndNewlines)
            XCTAssertNotEqual(p, "100%", "df \(flag)")
        }
    }
}
