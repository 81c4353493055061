import CASCore
import Foundation
import TestSupport
import XCTest

/// A zero-config `casfs mount --foreground` (no `--config`): the store, its
/// staging directory and its private Redis live in `<root>/xdg/casfs`, the
/// data directory of `XDG_DATA_HOME=<root>/xdg`.
final class ZeroConfigMount: @unchecked Sendable {
    let root: String
    let mountpoint: String
    let logPath: String
    private(set) var options: [String]
    private(set) var process: Process?

    var xdg: String { root + "/xdg" }
    var dataDirectory: String { xdg + "/casfs" }
    var redisSocket: String { dataDirectory + "/redis/redis.sock" }
    var sha256: String { mountpoint + "/sha256" }
    func path(_ d: Digest) -> String { "\(sha256)/\(d)" }
    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    var pid: pid_t { process?.processIdentifier ?? 0 }
    var isRunning: Bool { process?.isRunning ?? false }
    /// `XDG_DATA_HOME=...` for shell commands that use the same store.
    var env: String { "XDG_DATA_HOME=\(shq(xdg))" }

    init(root: String, options: [String] = []) throws {
        try requireFuse()
        self.root = root
        mountpoint = root + "/mnt"
        logPath = root + "/casfs.log"
        self.options = options
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        try mount()
    }

    /// Starts the daemon and waits until the mount answers.
    func mount() throws {
        var args = ["mount", "--foreground"]
        for o in options { args += ["-o", o] }
        args.append(mountpoint)
        var environment = ProcessInfo.processInfo.environment
        environment["XDG_DATA_HOME"] = xdg
        let p = try startLoggedProcess(try casfsBinary(), args, log: logPath, environment: environment)
        process = p
        let up = pollUntil(60) { !p.isRunning || isFuseMounted(mountpoint) }
        guard up, p.isRunning else {
            throw MountError("zero-config casfs did not mount \(mountpoint) (running: \(p.isRunning)); log:\n\(log)")
        }
        guard runShell("ls \(shq(mountpoint)) >/dev/null").ok else {
            throw MountError("zero-config mount at \(mountpoint) does not answer; log:\n\(log)")
        }
    }

    /// `fusermount3 -u` (lazy if busy), then waits for the daemon to exit.
    func unmount() {
        if isFuseMounted(mountpoint), !runShell("fusermount3 -u \(shq(mountpoint))").ok {
            runShell("fusermount3 -uz \(shq(mountpoint))")
        }
        guard let p = process else { return }
        if p.isRunning, !pollUntil(30, { !p.isRunning }) { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        process = nil
    }

    /// The private Redis's pid, from its pid file.
    func redisPID() -> pid_t? {
        let text = (try? String(contentsOfFile: dataDirectory + "/redis/redis.pid", encoding: .utf8)) ?? ""
        return pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Runs one redis-cli command against the private Redis.
    @discardableResult
    func redis(_ args: String) -> String {
        runShell("redis-cli -s \(shq(redisSocket)) \(args)").stdout
    }

    func stats() throws -> [String: Int64] { try mountStats(mountpoint) }

    /// Unmounts, then stops a private Redis left running (a daemon killed with -9 leaves it).
    func shutDown() {
        unmount()
        if let pid = redisPID(), kill(pid, 0) == 0 {
            runShell("redis-cli -s \(shq(redisSocket)) SHUTDOWN NOSAVE")
            _ = pollUntil(10) { kill(pid, 0) != 0 }
        }
    }
}

extension MountTestCase {
    /// A zero-config mount in this test's temp dir, shut down in tearDown.
    func zeroConfigMount(name: String = "zc", options: [String] = []) throws -> ZeroConfigMount {
        let m = try ZeroConfigMount(root: tmp + "/" + name, options: options)
        addTeardownBlock { m.shutDown() }
        return m
    }

    /// Bytes of the file at `path` (a failing test, not a crash, if unreadable).
    func contents(_ path: String) -> Data? { FileManager.default.contents(atPath: path) }
}
