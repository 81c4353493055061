import CASCore
import Foundation

/// Result of a shell command.
public struct ShellResult: CustomStringConvertible {
    public let status: Int32
    public let stdout: String
    public let stderr: String
    public var ok: Bool { status == 0 }
    public var description: String { "status \(status)\nstdout: \(stdout.prefix(2000))\nstderr: \(stderr.prefix(2000))" }
}

/// Runs `command` with bash, waiting for it. Output goes through temporary
/// files, so large outputs cannot deadlock.
@discardableResult
public func runShell(_ command: String, environment: [String: String] = [:]) -> ShellResult {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("casfs-sh-\(UUID().uuidString)")
    try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    let out = dir.appendingPathComponent("out"), err = dir.appendingPathComponent("err")
    _ = FileManager.default.createFile(atPath: out.path, contents: nil)
    _ = FileManager.default.createFile(atPath: err.path, contents: nil)
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/bash")
    p.arguments = ["-c", command]
    var env = ProcessInfo.processInfo.environment
    for (k, v) in environment { env[k] = v }
    p.environment = env
    do {
        p.standardOutput = try FileHandle(forWritingTo: out)
        p.standardError = try FileHandle(forWritingTo: err)
        p.standardInput = FileHandle.nullDevice
        try p.run()
    } catch {
        return ShellResult(status: -1, stdout: "", stderr: "could not run bash: \(error)")
    }
    p.waitUntilExit()
    let o = (try? String(contentsOf: out, encoding: .utf8)) ?? ""
    let e = (try? String(contentsOf: err, encoding: .utf8)) ?? ""
    return ShellResult(status: p.terminationStatus, stdout: o, stderr: e)
}

/// Single-quotes `s` for bash.
public func shq(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }

public struct MountError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// Finds the built `casfs` executable: it sits next to the test bundle in the build directory.
public func casfsBinary() throws -> String {
    var candidates: [URL] = []
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    var dir = exe.deletingLastPathComponent()
    for _ in 0..<4 {
        candidates.append(dir.appendingPathComponent("casfs"))
        dir = dir.deletingLastPathComponent()
    }
    for b in Bundle.allBundles { candidates.append(b.bundleURL.deletingLastPathComponent().appendingPathComponent("casfs")) }
    for c in candidates where FileManager.default.isExecutableFile(atPath: c.path) && !c.hasDirectoryPath {
        var isDir: ObjCBool = false
        if FileManager.default.fileExists(atPath: c.path, isDirectory: &isDir), !isDir.boolValue { return c.path }
    }
    throw MountError("casfs binary not found next to the test bundle (looked at \(candidates.map(\.path))); build it with `swift build` first")
}

/// Fails (never skips) when FUSE is not usable here.
public func requireFuse() throws {
    guard FileManager.default.fileExists(atPath: "/dev/fuse") else {
        throw MountError("/dev/fuse is missing: FUSE mount tests need the fuse device (load the fuse module or run the container with --device /dev/fuse)")
    }
    guard runShell("command -v fusermount3").ok else {
        throw MountError("fusermount3 is not installed: FUSE mount tests need it (apt-get install fuse3)")
    }
}

/// True if `path` is a mount point of a FUSE filesystem right now.
public func isFuseMounted(_ path: String) -> Bool {
    guard let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return false }
    // Resolve only the parent: a stat of the mount point itself would wait for the daemon.
    let url = URL(fileURLWithPath: path)
    let real = url.deletingLastPathComponent().resolvingSymlinksInPath().appendingPathComponent(url.lastPathComponent).path
    for line in info.split(separator: "\n") {
        let f = line.split(separator: " ")
        guard f.count > 4 else { continue }
        let mp = f[4].replacingOccurrences(of: "\\040", with: " ")
        if (mp == real || mp == path) && line.contains(" - fuse") { return true }
    }
    return false
}

/// Waits (polling) until `condition` holds; false if `limit` seconds pass first.
public func pollUntil(_ limit: Double = 60, _ condition: () -> Bool) -> Bool {
    let end = Date().addingTimeInterval(limit)
    while Date() < end {
        if condition() { return true }
        usleep(50_000)
    }
    return condition()
}

/// Paths of a blob in BuildGrid's disk layout under `root`.
public func diskObjectPath(root: String, _ d: Digest) -> String {
    let h = d.hash
    return "\(root)/cas/objects/\(h.prefix(2))/\(h.dropFirst(2))"
}

/// A `casfs mount --foreground` daemon on a temporary mount point.
public final class CasfsMount: @unchecked Sendable {
    public let root: String
    public let mountpoint: String
    public let configPath: String
    public let stagingDir: String
    public let logPath: String
    public private(set) var options: [String]
    public private(set) var process: Process?

    /// Writes `config` (YAML) to a file and mounts it. `root` is a temp dir owned by the caller.
    public init(root: String, config: String, options: [String] = []) throws {
        try requireFuse()
        self.root = root
        self.mountpoint = root + "/mnt"
        self.configPath = root + "/casfs.yaml"
        self.stagingDir = root + "/staging"
        self.logPath = root + "/casfs.log"
        self.options = options
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: stagingDir, withIntermediateDirectories: true)
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        try mount()
    }

    public var pid: pid_t { process?.processIdentifier ?? 0 }
    public var sha256: String { mountpoint + "/sha256" }
    public func path(_ d: Digest) -> String { "\(sha256)/\(d)" }
    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Starts the daemon and waits until the mount answers.
    public func mount(extraOptions: [String]? = nil) throws {
        if let extraOptions { options = extraOptions }
        var args = ["mount", "--foreground", "--config", configPath, "--staging-dir", stagingDir]
        for o in options { args += ["-o", o] }
        args.append(mountpoint)
        let p = try startLoggedProcess(try casfsBinary(), args, log: logPath)
        process = p
        let up = pollUntil(60) { !p.isRunning || isFuseMounted(mountpoint) }
        guard up, p.isRunning else {
            throw MountError("casfs did not mount \(mountpoint) (running: \(p.isRunning)); log:\n\(log)")
        }
        // The first request waits for INIT; make sure the mount answers.
        guard runShell("ls \(shq(mountpoint)) >/dev/null").ok else {
            throw MountError("mount at \(mountpoint) does not answer; log:\n\(log)")
        }
    }

    /// Peak resident set size of the daemon in KiB (VmHWM).
    public func peakRSSKiB() -> Int? {
        guard let s = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        for line in s.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
        }
        return nil
    }

    /// The mount's metrics, from the root's `user.casfs.stats` xattr.
    public func stats() throws -> [String: Int64] { try mountStats(mountpoint) }

    public var isRunning: Bool { process?.isRunning ?? false }

    /// Kills the daemon with SIGKILL (the mount is left dead until unmounted).
    public func kill9() {
        guard let p = process, p.isRunning else { return }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
    }

    /// `fusermount3 -u`, falling back to a lazy unmount; waits for the daemon to exit.
    @discardableResult
    public func unmount() -> Int32? {
        if isFuseMounted(mountpoint) {
            if !runShell("fusermount3 -u \(shq(mountpoint))").ok {
                runShell("fusermount3 -uz \(shq(mountpoint))")
            }
        }
        guard let p = process else { return nil }
        if p.isRunning, !pollUntil(30, { !p.isRunning }) {
            kill(p.processIdentifier, SIGKILL)
        }
        p.waitUntilExit()
        process = nil
        return p.terminationStatus
    }

    deinit { unmount() }
}

/// A fresh temporary directory for one test.
public func makeMountTempDir(_ name: String = "casfs-test") throws -> String {
    let base = ProcessInfo.processInfo.environment["CASFS_TEST_TMP"] ?? "/var/tmp"
    let path = "\(base)/\(name)-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// Starts `executable` with `arguments` (and `environment`, else this
/// process's), stdin from /dev/null and stdout and stderr appended to the
/// file `log`.
public func startLoggedProcess(_ executable: String, _ arguments: [String], log: String,
                               environment: [String: String]? = nil) throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    if let environment { p.environment = environment }
    if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
    handle.seekToEndOfFile()
    p.standardOutput = handle
    p.standardError = handle
    p.standardInput = FileHandle.nullDevice
    try p.run()
    return p
}

/// A mount's metrics from its root's `user.casfs.stats` xattr: every sample
/// under its full key (`name{labels}`), and each metric's samples summed
/// under its bare name.
public func mountStats(_ mountpoint: String) throws -> [String: Int64] {
    // getfattr asks for the size, then the value: a counter that gained a
    // digit in between makes the second call fail with ERANGE. Ask again.
    var r = runShell("getfattr --only-values -n user.casfs.stats \(shq(mountpoint))")
    for _ in 0..<5 where !r.ok && r.stderr.contains("Numerical result out of range") {
        r = runShell("getfattr --only-values -n user.casfs.stats \(shq(mountpoint))")
    }
    guard r.ok, let data = r.stdout.data(using: .utf8),
          let obj = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
        throw MountError("no stats xattr: \(r)")
    }
    var out: [String: Int64] = [:]
    for (k, v) in obj {
        guard let n = v as? NSNumber else { continue }
        out[k] = n.int64Value
        if let brace = k.firstIndex(of: "{") { out[String(k[..<brace]), default: 0] += n.int64Value }
    }
    return out
}
