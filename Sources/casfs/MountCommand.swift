import ArgumentParser
import CASConfig
import CASCore
import CASFuse
import CFuse
import CASStorage
import Foundation
import Logging
import MetricsServer
import Synchronization

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount the store on MOUNTPOINT.",
        discussion: """
            Returns once the mount is ready (the daemon keeps serving in the
            background) unless --foreground is given. Unmount with
            `fusermount3 -u MOUNTPOINT`, or SIGINT/SIGTERM to the daemon.
            """)

    @Option(name: .long, help: "YAML config (BuildGrid storage tags plus a mount: section). Without it: a local store in $XDG_DATA_HOME/casfs indexed by a private Redis, writable.")
    var config: String?

    @Option(name: .customShort("o"), help: ArgumentHelp(
        "Mount options, comma separated: rw, ro, allow_other, entry_timeout=S, attr_timeout=S, negative_timeout=S, threads=N, max_read=N, fsname=NAME, open/noopen (a read-only mount is open-less by default: the kernel opens files without asking the daemon, and access times are refreshed at lookup; `open` asks at each open), passthrough=auto|off (auto: verified local blob files are read by the kernel directly, needs root; writable mounts), metrics=HOST:PORT (serve GET /metrics for Prometheus there). Override the config.",
        valueName: "opts"))
    var options: [String] = []

    @Flag(name: .long, help: "Stay in the foreground and log to stderr.")
    var foreground = false

    @Option(name: .long, help: "Directory for files being written (default: the data directory without --config, else /var/tmp).")
    var stagingDir: String?

    @Option(name: .long, help: "Append the daemon's log to this file.")
    var logFile: String?

    @Flag(name: .shortAndLong, help: "Log debug messages.")
    var verbose = false

    /// A mount that `casfs run` makes for one run: it is not recorded as the
    /// data directory's mount for other commands to find.
    @Flag(name: .long, help: .hidden)
    var temporary = false

    @Argument(help: "Where to mount.")
    var mountpoint: String

    /// Checks the arguments before anything starts; each problem is one line.
    func check() throws {
        _ = try parsedOverrides()
        // First: a dead FUSE mount there fails every stat (ENOTCONN), which
        // would read as "not a directory".
        if isMountPoint(mountpoint) {
            if isDeadFuseMount(mountpoint) { throw ServeError.deadMountpoint(mountpoint) }
            throw CLIError("\(mountpoint) is already a mount point (unmount it first: fusermount3 -u \(mountpoint))")
        }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: mountpoint, isDirectory: &isDir), isDir.boolValue else {
            throw CLIError("mount point \(mountpoint) is not a directory")
        }
    }

    func parsedOverrides() throws -> MountOverrides {
        do { return try MountOverrides.parse(options) } catch let e as MountOverrides.BadOption {
            throw CLIError(e.description)
        }
    }

    func run() throws {
        do { try check() } catch {
            printError(error)
            throw ExitCode(2)
        }
        if !foreground {
            var args = Array(CommandLine.arguments.dropFirst())
            args.append("--foreground")
            if logFile == nil {
                // The daemon has no terminal: its log goes to the data directory unless told otherwise.
                args += ["--log-file", MountCommand.defaultLogFile()]
            }
            do {
                _ = try Daemon.spawnAndWait(arguments: args)
            } catch {
                FileHandle.standardError.write(Data("casfs: \(error)\n".utf8))
                throw ExitCode.failure
            }
            return
        }
        let ready = Daemon.readyFD()
        if let ready {
            Daemon.closeInheritedDescriptors(keeping: ready)
            _ = fcntl(ready, F_SETFD, FD_CLOEXEC)
            unsetenv(Daemon.readyEnv)
            setsid()
        }
        do {
            try serve(ready: ready)
        } catch {
            FileHandle.standardError.write(Data("casfs: \(error)\n".utf8))
            if let ready { Daemon.report(ready, "ERR \(error)") }
            throw ExitCode.failure
        }
    }

    /// The background daemon's log file unless --log-file is given (its directory is created).
    static func defaultLogFile() -> String {
        let dir = DefaultConfig.dataDirectory()
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir + "/casfs.log"
    }

    private func setUpLogging() {
        if let logFile {
            let fd = open(logFile, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            if fd >= 0 {
                dup2(fd, 2)
                close(fd)
            }
        }
        let level: Logger.Level = verbose ? .debug : .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
    }

    private func serve(ready: Int32?) throws {
        setUpLogging()
        let log = Logger(label: "casfs.mount")
        // Read once and hidden from what the daemon starts (a private Redis).
        let systemd = SystemdNotify.take()
        let overrides = try parsedOverrides()
        let staging = absolute(stagingDir ?? (config == nil ? DefaultConfig.dataDirectory() + "/staging" : "/var/tmp"))
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        let mountpoint = absolute(self.mountpoint)

        // The zero-config default starts a private Redis; the mount owns it and stops it at unmount.
        let stack = try OpenStack(configPath: config, keepRedis: true)
        var mountOptions = stack.stack.mount
        overrides.apply(to: &mountOptions)
        mountOptions.configPath = config.map(absolute)
        if overrides.noOpen == true && mountOptions.writable {
            stack.close()
            throw ValidationError("-o noopen needs a read-only mount (-o ro)")
        }

        do { try stack.storage.start() } catch {
            stack.close()
            throw error
        }
        // GET /metrics for Prometheus, with `metrics-address`; stopped at unmount.
        let metricsServer: MetricsServer?
        do { metricsServer = try mountOptions.metricsAddress.map { try MetricsServer.start($0, metrics: stack.metrics) } } catch {
            stack.close()
            throw error
        }
        defer { metricsServer?.stop() }
        var recorder: (@Sendable (Digest) -> Void)?
        if let batcher = stack.stack.accessTimes {
            recorder = { @Sendable (d: Digest) in batcher.record(d) }
        }

        if overrides.noOpen == true { mountOptions.openless = true }
        // df shows the free space of the disk stores, where blobs land.
        let stores = stack.stack.nodes.values.compactMap { ($0 as? DiskStorage)?.root }.sorted()
        // A store on overlayfs needs a deeper stack for passthrough.
        mountOptions.passthroughStackDepth = PassthroughDepth.required(forFilesUnder: stores)
        if mountOptions.passthroughStackDepth > 1 && mountOptions.passthrough && !mountOptions.isOpenless {
            log.info("the store is on a stacked filesystem (overlayfs): passthrough with max_stack_depth 2, so no overlayfs can be stacked on this mount")
        }
        let fs = CASFileSystem(storage: stack.storage, index: stack.index, options: mountOptions,
                               stagingDirectory: staging, spaceDirectories: stores, recordAccess: recorder,
                               metrics: stack.metrics)
        // Paths are absolute from here on: do not keep the starting directory busy.
        _ = chdir("/")
        log.info("mounting \(mountpoint) with \(config ?? "the zero-config default in \(DefaultConfig.dataDirectory())")")
        var watchdog: PrivateRedisWatchdog?
        if let data = stack.dataDirectory, let index = stack.index {
            // A partly lost index (Redis data lost under load) is repaired in
            // the background: blobs on disk it lacks come back.
            reindexInBackground(index, data: data, log: log)
            // A private Redis that dies is started again, and the entries it
            // had not yet written to its append-only file come back the same way.
            if let redis = stack.privateRedis {
                watchdog = PrivateRedisWatchdog.start(redis, log: log) {
                    reindexInBackground(index, data: data, log: log)
                }
            }
        }
        defer { stack.close() }
        let scrub = scrubInBackground(stack.stack, mountOptions, fs)
        defer { scrub?.stop() }
        // Once the mount is gone, the store is no longer recorded as served
        // (a new mount waits for this daemon to finish instead of being
        // turned away), and the Redis that close() stops is not restarted.
        defer {
            stack.withdrawMountPoint()
            watchdog?.stop()
        }
        // A zero-config mount tells other commands (casfs run) where it is.
        let record = stack.mountPointRecorder(temporary ? nil : mountpoint)
        try fs.serve(mountpoint: mountpoint) {
            record?()
            if let ready { Daemon.report(ready, "OK") }
            if !temporary { systemd?.ready(log) }
        }
    }
}

/// True if `path` is the mount point of a mounted filesystem (read from
/// /proc/self/mountinfo, so a dead FUSE mount does not block the check).
func isMountPoint(_ path: String) -> Bool {
    guard let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return false }
    let url = URL(fileURLWithPath: path).standardizedFileURL
    let real = url.deletingLastPathComponent().resolvingSymlinksInPath().appendingPathComponent(url.lastPathComponent).path
    for line in info.split(separator: "\n") {
        let fields = line.split(separator: " ")
        guard fields.count > 4 else { continue }
        let mp = fields[4].replacingOccurrences(of: "\\040", with: " ")
        if mp == real { return true }
    }
    return false
}

/// True if `path` is a FUSE mount whose daemon is gone (ENOTCONN). statfs
/// always reaches the daemon (a stat or a listing may come from the
/// kernel's cache); it runs on a thread of its own, so a daemon that is
/// alive but slow to answer is taken for alive after a few seconds.
func isDeadFuseMount(_ path: String) -> Bool {
    let result = Mutex<Int32?>(nil)
    let answered = DispatchSemaphore(value: 0)
    let t = Thread {
        var st = statvfs()
        let rc = statvfs(path, &st) == 0 ? 0 : errno
        result.withLock { $0 = rc }
        answered.signal()
    }
    t.start()
    guard answered.wait(timeout: .now() + 5) == .success else { return false }
    return result.withLock { $0 } == ENOTCONN
}

/// True if `path` is served by a live casfs mount (its root has the stats attribute).
func isCasfsMount(_ path: String) -> Bool {
    getxattr(path, "user.casfs.stats", nil, 0) > 0
}

/// `path` made absolute from the current directory.
func absolute(_ path: String) -> String {
    path.hasPrefix("/") ? path : URL(fileURLWithPath: FileManager.default.currentDirectoryPath + "/" + path).standardizedFileURL.path
}
