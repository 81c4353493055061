import CASCore
import Foundation
import TestSupport
import XCTest

/// What an operator meets: messages that name the cause and the way out,
/// quick remounts, and a zero-config mount that outlives its private Redis.
final class OperatorTests: MountTestCase {
    /// A mount by an unprivileged user that cannot get the FUSE device says
    /// why (libfuse's or fusermount3's own words), not a guess.
    func testUnprivilegedMountFailureNamesTheCause() throws {
        let bin = try casfsBinary()
        let home = tmp + "/nobody"
        let mp = home + "/mnt"
        try FileManager.default.createDirectory(atPath: mp, withIntermediateDirectories: true)
        mustSh("chown -R nobody: \(shq(home)) && chmod 755 \(shq(tmp))")
        defer { if isFuseMounted(mp) { runShell("fusermount3 -u \(shq(mp)) || umount -l \(shq(mp))") } }
        let device = mustSh("stat -c %a /dev/fuse").trimmingCharacters(in: .whitespacesAndNewlines)
        let r = sh("cd / && setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=\(shq(home)) XDG_DATA_HOME=\(shq(home + "/xdg")) \(shq(bin)) mount --log-file \(shq(home + "/log")) \(shq(mp))")
        XCTAssertFalse(r.ok, "nobody mounted casfs (/dev/fuse mode \(device)): this test needs a machine where that fails")
        XCTAssertFalse(isFuseMounted(mp))
        let message = r.stderr
        XCTAssertTrue(message.contains("/dev/fuse") || message.contains("fusermount3"), message)
        XCTAssertTrue(message.contains("Permission denied") || message.contains("not permitted") || message.contains("no write access")
                      || message.contains("Operation not permitted"), message)
        XCTAssertFalse(message.contains("is /dev/fuse there"), message)
        XCTAssertFalse(message.contains("bad mount options"), message)
        XCTAssertEqual(message.split(separator: "\n").count, 1, "one line: \(message)")
        // Nothing left running for nobody (its private Redis is stopped again).
        XCTAssertTrue(pollUntil(15) { !self.sh("pgrep -u nobody -f \(shq(home))").ok }, sh("pgrep -a -u nobody").stdout)
    }

    /// `casfs mount` on a dead mount point (daemon killed) says how to recover.
    func testMountOnADeadMountPointSaysHowToRecover() throws {
        let m = try mount(cachedDiskConfig())
        m.kill9()
        // statfs always reaches the daemon (a listing may come from the kernel's cache).
        let dead = sh("stat -f \(shq(m.mountpoint))")
        XCTAssertTrue(dead.stderr.contains("Transport endpoint is not connected"), "\(dead)")
        let r = sh("\(shq(try casfsBinary())) mount --config \(shq(m.configPath)) \(shq(m.mountpoint))")
        XCTAssertFalse(r.ok)
        XCTAssertTrue(r.stderr.contains("fusermount3 -u \(m.mountpoint)"), r.stderr)
        XCTAssertTrue(r.stderr.contains("dead"), r.stderr)
        XCTAssertFalse(r.stderr.contains("not a directory"), r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        // Following the advice works.
        mustSh("fusermount3 -u \(shq(m.mountpoint))")
        try m.mount()
        XCTAssertEqual(mustSh("ls \(shq(m.mountpoint))"), "sha256\ntree\n")
    }

    /// Unmounting the zero-config mount and mounting again at once works,
    /// every time, while the old daemon may still be finishing.
    func testZeroConfigRemountAtOnce() throws {
        let bin = try casfsBinary()
        let m = try zeroConfigMount()
        m.unmount()
        let mp = m.mountpoint
        defer { if isFuseMounted(mp) { runShell("fusermount3 -u \(shq(mp))") } }
        var blobs: [(String, Digest)] = []
        for i in 0..<8 {
            let r = sh("\(m.env) \(shq(bin)) mount --log-file \(shq(m.logPath)) \(shq(mp))")
            XCTAssertTrue(r.ok, "mount \(i) right after an unmount: \(r.stderr)")
            guard r.ok else { break }
            // Work for the daemon to finish at unmount: writes and reads (access times to flush).
            let blob = try localBlob(randomData(200_000 + i, seed: 60 + UInt64(i)))
            blobs.append(blob)
            mustSh("cp \(shq(blob.path)) \(shq(mp + "/sha256/\(blob.digest)"))")
            for (p, d) in blobs { XCTAssertEqual(mustSh("cmp \(shq(p)) \(shq(mp + "/sha256/\(d)")) && echo same"), "same\n") }
            mustSh("fusermount3 -u \(shq(mp))")
        }
        XCTAssertFalse(m.log.contains("another casfs mount already serves"), m.log)
    }

    /// A mount right after an unmount whose daemon is still finishing (its
    /// last access-time flush waits on a frozen Redis): the new mount waits
    /// for the old one to let go instead of failing at once.
    func testZeroConfigRemountWhileTheOldDaemonFinishes() throws {
        let bin = try casfsBinary()
        let m = try zeroConfigMount()
        let (src, d) = try localBlob(randomData(300_000, seed: 65))
        mustSh("cp \(shq(src)) \(shq(m.path(d)))")
        m.unmount()
        try m.mount()
        let redisPid = try XCTUnwrap(m.redisPID())
        // A read (an access time to flush at unmount), then Redis frozen.
        mustSh("cat \(shq(m.path(d))) > /dev/null && kill -STOP \(redisPid)")
        defer { kill(redisPid, SIGCONT) }
        mustSh("fusermount3 -u \(shq(m.mountpoint))")
        XCTAssertTrue(m.isRunning, "the old daemon should still be finishing")
        let out = tmp + "/remount.err"
        let again = Process()
        again.executableURL = URL(fileURLWithPath: "/bin/bash")
        again.arguments = ["-c", "\(m.env) \(shq(bin)) mount --log-file \(shq(m.logPath)) \(shq(m.mountpoint)) 2> \(shq(out))"]
        try again.run()
        // Without waiting, the new mount would fail right away; give it the chance to.
        let exitedWhileFrozen = pollUntil(5) { !again.isRunning }
        kill(redisPid, SIGCONT)
        again.waitUntilExit()
        let err = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        XCTAssertEqual(again.terminationStatus, 0, "remount while the old daemon finishes (exited while Redis was frozen: \(exitedWhileFrozen)): \(err)")
        XCTAssertFalse(err.contains("another casfs mount already serves"), err)
        defer { runShell("fusermount3 -u \(shq(m.mountpoint))") }
        XCTAssertTrue(pollUntil(30) { !m.isRunning }, "the old daemon did not finish")
        XCTAssertEqual(mustSh("cmp \(shq(src)) \(shq(m.path(d))) && echo same"), "same\n")
    }

    /// The zero-config mount's private Redis killed with -9: the mount starts
    /// it again (same directory, append-only file) and serves again, without
    /// a remount.
    func testZeroConfigMountRestartsItsPrivateRedis() throws {
        let m = try zeroConfigMount()
        let (pa, da) = try localBlob(randomData(100_000, seed: 70))
        mustSh("cp \(shq(pa)) \(shq(m.path(da)))")
        // Let the append-only file hold it (fsync every second).
        XCTAssertTrue(pollUntil(30) { self.sh("grep -rqa \(da.hash) \(shq(m.dataDirectory + "/redis"))").ok },
                      "the append-only file never held the blob's key")
        let first = try XCTUnwrap(m.redisPID())
        XCTAssertEqual(kill(first, SIGKILL), 0)
        XCTAssertTrue(pollUntil(30) { kill(first, 0) != 0 || self.isZombie(first) })
        // Back within a bounded time, with no remount.
        XCTAssertTrue(pollUntil(60) { self.sh("cmp \(shq(pa)) \(shq(m.path(da)))").ok }, "the indexed blob is not served again; log:\n\(m.log.suffix(3000))")
        // (Blobs found present lately are served without Redis: wait for the new one.)
        XCTAssertTrue(pollUntil(60) { (m.redisPID() ?? first) != first }, "the private Redis was not started again")
        let second = try XCTUnwrap(m.redisPID())
        XCTAssertNotEqual(second, first)
        XCTAssertEqual(kill(second, 0), 0)
        XCTAssertEqual(redisServers(m), [second], "exactly one server on the data directory")
        let (pb, db) = try localBlob(randomData(100_001, seed: 71))
        XCTAssertTrue(pollUntil(60) { self.sh("cp \(shq(pb)) \(shq(m.path(db)))").ok }, "cp does not work again; log:\n\(m.log.suffix(3000))")
        XCTAssertEqual(m.redis("EXISTS A:\(db)").trimmingCharacters(in: .whitespacesAndNewlines), "1")
        XCTAssertEqual(mustSh("ls \(shq(m.sha256)) | sort"), [da, db].map(\.description).sorted().joined(separator: "\n") + "\n")
        XCTAssertTrue(m.log.contains("private Redis"), m.log)
        XCTAssertTrue(m.isRunning)
        // Unmounting still stops it.
        m.unmount()
        XCTAssertTrue(pollUntil(30) { kill(second, 0) != 0 || self.isZombie(second) }, "the restarted Redis outlived the mount")
        XCTAssertEqual(redisServers(m), [], "a redis-server of the data directory outlived the mount")
    }

    /// The live redis-server processes serving `m`'s private Redis socket.
    func redisServers(_ m: ZeroConfigMount) -> [pid_t] {
        sh("pgrep -f \(shq("redis-server unixsocket:" + m.redisSocket))").stdout.split(separator: "\n")
            .compactMap { pid_t($0) }.filter { !isZombie($0) && kill($0, 0) == 0 }
    }

    /// The daemon out of descriptors (its limit lowered to what it holds):
    /// its private Redis is not taken for gone, no second server starts;
    /// killed meanwhile, it is started again (once) when descriptors are
    /// back; after the unmount no server of the data directory is left.
    func testDescriptorExhaustionNeverStartsASecondRedis() throws {
        let m = try zeroConfigMount()
        let (pa, da) = try localBlob(randomData(50_000, seed: 72))
        mustSh("cp \(shq(pa)) \(shq(m.path(da)))")
        let first = try XCTUnwrap(m.redisPID())
        XCTAssertEqual(redisServers(m), [first])
        let limits = mustSh("prlimit --pid \(m.pid) --nofile --output SOFT,HARD --noheadings").split(separator: " ").map(String.init)
        XCTAssertEqual(limits.count, 2, "\(limits)")
        // No descriptor to spare: a soft limit of 3 makes every new descriptor
        // of the daemon (open, socket, accept, pidfd) fail with EMFILE.
        mustSh("prlimit --pid \(m.pid) --nofile=3:\(limits[1])")
        // Reads that need a descriptor fail; the watchdog ticks several times meanwhile.
        for _ in 0..<5 {
            _ = sh("cat \(shq(m.path(da))) > /dev/null; ls \(shq(m.sha256)) > /dev/null")
            usleep(400_000)
        }
        XCTAssertEqual(redisServers(m), [first], "the server was taken for gone")
        // Killed while the daemon cannot even open the lock file: nothing is started.
        XCTAssertEqual(kill(first, SIGKILL), 0)
        usleep(2_000_000)
        XCTAssertEqual(redisServers(m), [], "a server started without the lock being checked")
        // Descriptors back: exactly one server again, and the mount serves.
        mustSh("prlimit --pid \(m.pid) --nofile=\(limits[0]):\(limits[1])")
        XCTAssertTrue(pollUntil(60) { self.redisServers(m).count == 1 }, "the private Redis did not come back; log:\n\(m.log.suffix(3000))")
        XCTAssertTrue(pollUntil(60) { self.sh("cmp \(shq(pa)) \(shq(m.path(da)))").ok }, "log:\n\(m.log.suffix(3000))")
        usleep(1_000_000)
        XCTAssertEqual(redisServers(m).count, 1)
        XCTAssertTrue(m.log.contains("not starting a server until it can be checked"), m.log)
        m.unmount()
        XCTAssertTrue(pollUntil(30) { self.redisServers(m).isEmpty }, "a redis-server of the data directory outlived the mount")
    }

    func isZombie(_ pid: pid_t) -> Bool {
        ((try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? "").contains(") Z ")
    }
}
