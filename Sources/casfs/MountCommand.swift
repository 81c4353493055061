import ArgumentParser
import CASConfig
import CASCore
import CASDaemon
import CASFuse
import Foundation
import Logging

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
        if MountTable.isMountPoint(mountpoint) {
            if MountTable.isDeadFuseMount(mountpoint) { throw ServeError.deadMountpoint(mountpoint) }
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
                _ = try BackgroundStart.spawnAndWait(arguments: args)
            } catch {
                FileHandle.standardError.write(Data("casfs: \(error)\n".utf8))
                throw ExitCode.failure
            }
            return
        }
        let ready = BackgroundStart.readyFD()
        if let ready {
            BackgroundStart.closeInheritedDescriptors(keeping: ready)
            _ = fcntl(ready, F_SETFD, FD_CLOEXEC)
            unsetenv(BackgroundStart.readyEnv)
            setsid()
        }
        do {
            try serve(ready: ready)
        } catch {
            FileHandle.standardError.write(Data("casfs: \(error)\n".utf8))
            if let ready { BackgroundStart.report(ready, "ERR \(error)") }
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
        if overrides.noOpen == true && mountOptions.writable {
            stack.close()
            throw ValidationError("-o noopen needs a read-only mount (-o ro)")
        }

        if overrides.noOpen == true { mountOptions.openless = true }
        let daemon = try MountDaemon(stack: stack, options: mountOptions, mountpoint: mountpoint,
                                     stagingDirectory: staging, temporary: temporary, log: log)
        log.info("mounting \(mountpoint) with \(config ?? "the zero-config default in \(DefaultConfig.dataDirectory())")")
        let temporary = self.temporary
        try runBlocking {
            try await daemon.run {
                if let ready { BackgroundStart.report(ready, "OK") }
                if !temporary { systemd?.ready(log) }
            }
        }
    }
}
