import CASCore
import Foundation
import TestSupport
import XCTest

/// No reader gets wrong bytes: blobs written through a mount, then damaged
/// on disk behind casfs's back (one byte flipped, same length), are read
/// with shell tools on a fresh mount. Every read either fails or returns the
/// right bytes; the damage is counted, logged with the digest and repaired.
final class TrustTests: MountTestCase {
    var server: BuildGridServer?

    override func tearDown() {
        super.tearDown()
        server?.stop()
        server = nil
    }

    /// A blob kept in a local file, and the byte of its stored copy to damage.
    struct Sample {
        let path: String
        let digest: Digest
        var flipAt: Int64 { digest.size / 2 }
    }

    /// 5 KB (hashed whole before it is served), 80 MB and 300 MB (streamed,
    /// verified by the read that reaches the end or jumps ahead).
    func samples() throws -> [Sample] {
        try [5_000, 80_000_000, 300_000_000].map { size in
            let path = "\(tmp)/src/blob-\(size)"
            return Sample(path: path, digest: try randomFile(path, size: Int64(size)))
        }
    }

    enum Tool: String, CaseIterable {
        case cat, sha256sum, ddWhole = "dd bs=4M", ddRange = "dd skip"
    }

    struct Outcome {
        let ok: Bool
        let rightBytes: Bool
        let text: String
    }

    /// Runs `tool` on the mounted file of `s`. `rightBytes` tells whether what
    /// it produced is what the blob holds (only meaningful when `ok`).
    func read(_ tool: Tool, _ s: Sample, in m: CasfsMount) throws -> Outcome {
        let file = shq(m.path(s.digest))
        let out = "\(tmp)/out-\(UUID().uuidString.prefix(8))"
        defer { unlink(out) }
        // `timeout` only guards the run against a hang.
        switch tool {
        case .cat, .ddWhole:
            let cmd = tool == .cat ? "cat \(file) > \(shq(out))" : "dd if=\(file) of=\(shq(out)) bs=4M status=none"
            let r = runShell("timeout 600 \(cmd)")
            let right = r.ok ? try sha256OfFile(out) == s.digest.hash : false
            return Outcome(ok: r.ok, rightBytes: right, text: "\(r)")
        case .sha256sum:
            let r = runShell("timeout 600 sha256sum \(file)")
            return Outcome(ok: r.ok, rightBytes: r.stdout.hasPrefix(s.digest.hash + " "), text: "\(r)")
        case .ddRange:
            // Three blocks around the damaged byte, from the middle of the blob.
            let bs: Int64 = s.digest.size > 1 << 20 ? 1 << 20 : 1 << 10
            let skip = max(0, s.flipAt / bs - 1)
            let count: Int64 = 3
            let r = runShell("timeout 600 dd if=\(file) of=\(shq(out)) bs=\(bs) skip=\(skip) count=\(count) status=none")
            let length = min(count * bs, s.digest.size - skip * bs)
            let right = r.ok ? try sha256OfFile(out) == sha256OfFile(s.path, offset: skip * bs, count: length) : false
            return Outcome(ok: r.ok, rightBytes: right, text: "\(r)")
        }
    }

    /// Every sample read with `tool` after its stored copy was damaged: no
    /// success with wrong bytes; the damage is detected, counted and logged.
    func checkDamagedReads(_ tool: Tool, _ samples: [Sample], _ m: CasfsMount, where what: String,
                           file: StaticString = #filePath, line: UInt = #line) throws {
        for s in samples {
            let before = try m.stats()["casfs_verify_failures_total"] ?? 0
            let o = try read(tool, s, in: m)
            XCTAssertFalse(o.ok && !o.rightBytes, "\(what): \(tool.rawValue) of damaged \(s.digest) exited 0 with wrong bytes", file: file, line: line)
            let after = try m.stats()["casfs_verify_failures_total"] ?? 0
            XCTAssertGreaterThan(after, before, "\(what): \(tool.rawValue) of damaged \(s.digest): the damage was not counted (\(o.text))", file: file, line: line)
            let logged = m.log.split(separator: "\n").contains { $0.contains("corrupt") && $0.contains(s.digest.description) }
            XCTAssertTrue(logged, "\(what): the damage of \(s.digest) was not logged with its digest", file: file, line: line)
        }
    }

    /// For each tool: writes the samples through the mount, remounts (so
    /// nothing holds them in memory), damages the store files, reads.
    func checkLocalStore(_ config: String, what: String) throws {
        let samples = try samples()
        let m = try mount(config)
        for tool in Tool.allCases {
            for s in samples { mustSh("cp \(shq(s.path)) \(shq(m.path(s.digest)))") }
            m.unmount()
            try m.mount()
            for s in samples { try flipByte(path: diskObjectPath(root: storeDir, s.digest), at: s.flipAt) }
            try checkDamagedReads(tool, samples, m, where: "\(what), \(tool.rawValue)")
            for s in samples {
                // Repaired: the damaged copy is gone from the store and the index.
                XCTAssertFalse(FileManager.default.fileExists(atPath: diskObjectPath(root: storeDir, s.digest)),
                               "\(what), \(tool.rawValue): the damaged copy of \(s.digest) is still in the store")
                XCTAssertFalse(try indexed(s.digest), "\(what), \(tool.rawValue): \(s.digest) is still indexed")
            }
        }
    }

    func testDamagedStoreFilesOnAnIndexedDiskMount() throws {
        try checkLocalStore(try indexedDiskConfig(), what: "index+disk")
    }

    func testDamagedStoreFilesBehindAMemoryCache() throws {
        try checkLocalStore(try cachedIndexedConfig(), what: "cache→index+disk")
    }

    /// After a damaged blob was detected, the next reader gets ENOENT (the
    /// copy was removed) or, where a fallback has a good copy, the right bytes.
    func testNextReaderAfterDamageGetsENOENT() throws {
        let small = Sample(path: tmp + "/src/small", digest: try randomFile(tmp + "/src/small", size: 5_000))
        let large = Sample(path: tmp + "/src/large", digest: try randomFile(tmp + "/src/large", size: 80_000_000))
        for (config, what) in [(try indexedDiskConfig(), "index+disk"), (try cachedIndexedConfig(), "cache→index+disk")] {
            let m = try mount(config, name: what.filter(\.isLetter))
            for s in [small, large] { mustSh("cp \(shq(s.path)) \(shq(m.path(s.digest)))") }
            m.unmount()
            try m.mount()
            for s in [small, large] {
                try flipByte(path: diskObjectPath(root: storeDir, s.digest), at: s.flipAt)
                let first = try read(.cat, s, in: m)
                XCTAssertFalse(first.ok, "\(what): cat of damaged \(s.digest) succeeded")
                let next = runShell("timeout 600 cat \(shq(m.path(s.digest))) | sha256sum | cut -c1-64; exit ${PIPESTATUS[0]}")
                if next.ok {
                    XCTAssertEqual(next.stdout, s.digest.hash + "\n", "\(what): the next reader of \(s.digest) got wrong bytes")
                } else {
                    XCTAssertTrue(next.stderr.contains("No such file or directory"),
                                  "\(what): the next reader of damaged \(s.digest) should get ENOENT: \(next)")
                }
            }
            m.unmount()
        }
    }

    /// A live BuildGrid serves a damaged copy (its disk store changed behind
    /// its back); casfs reads it through cache→remote and never passes it on.
    func testDamagedCopyOnARemoteBuildGrid() throws {
        let bgd = try BuildGridServer(directory: tmp + "/bgd")
        server = bgd
        let samples = try samples()
        let config = """
            storage: !with-cache-storage
              cache: !lru-storage
                size: 64M
              fallback: !remote-storage
                url: \(bgd.url)
                request-timeout: 120s
            mount:
              writable: true

            """
        let m = try mount(config)
        for s in samples { mustSh("cp \(shq(s.path)) \(shq(m.path(s.digest)))") }
        let missing = try bgd.client(["missing"] + samples.map(\.digest.description))
        XCTAssertEqual(missing.status, 0, missing.stderr)
        XCTAssertEqual(missing.stdout, "", "BuildGrid lacks blobs written through the mount")
        m.unmount()
        try m.mount()
        for s in samples { try flipByte(path: diskObjectPath(root: bgd.storePath, s.digest), at: s.flipAt) }
        for tool in Tool.allCases {
            try checkDamagedReads(tool, samples, m, where: "cache→remote, \(tool.rawValue)")
        }
        // The remote keeps its damaged copy: later readers fail too, never with its bytes.
        for s in samples {
            let o = try read(.cat, s, in: m)
            XCTAssertFalse(o.ok && !o.rightBytes, "cache→remote: a later cat of \(s.digest) exited 0 with wrong bytes")
        }
    }
}
