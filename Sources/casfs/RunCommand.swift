import ArgumentParser
import CASConfig
import CASCore
import CASDaemon
import CASProcess
import CASSandbox
import Foundation
import Synchronization

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a command in a bubblewrap sandbox on an input root from the store.",
        discussion: """
            The input root <mount>/tree/<hash>_<size> is bound read-only at \(Sandbox.input)
            and is the working directory; \(Sandbox.output) is writable (--output, else a
            scratch directory removed after the run); the whole mount is read-only at
            \(Sandbox.cas). Besides these the command sees only /usr, /etc (without what
            others may not read) and /bin, /sbin, /lib* read-only, a private /tmp, /dev
            and /proc of its own, and what --bind and --ro-bind add. It has no
            capabilities and no network but a private loopback unless --network. The
            environment names the paths: CASFS_INPUT_ROOT, CASFS_OUTPUT, CASFS_MOUNT.

            Without --mount, a running zero-config mount is used if there is one;
            otherwise the store (zero-config or --config) is mounted read-only on a
            temporary directory for the run and unmounted afterwards.

            Exits with the command's status (128+N when it dies from signal N);
            casfs run's own errors, a sandbox that cannot be built without
            privileges, and a command that cannot be started exit \(RunCommand.ownFailure).
            """)

    @Option(name: .long, help: ArgumentHelp("The REAPI Directory digest of the input root.", valueName: "hash_size"))
    var inputRoot: String?

    @Option(name: .long, help: "A casfs mount to use (default: a running zero-config mount, else a temporary one).")
    var mount: String?

    @Option(name: .long, help: "YAML config of the store to mount for the run (not with --mount).")
    var config: String?

    @Option(name: .long, help: ArgumentHelp("Host directory bound writable at \(Sandbox.output) (created if missing). Default: a scratch directory removed after the run.", valueName: "dir"))
    var output: String?

    @Option(name: .long, help: ArgumentHelp("Host path SRC shown writable at DST (default: SRC). Repeatable.", valueName: "SRC[:DST]"))
    var bind: [String] = []

    @Option(name: .long, help: ArgumentHelp("Host path SRC shown read-only at DST (default: SRC). Repeatable.", valueName: "SRC[:DST]"))
    var roBind: [String] = []

    @Option(name: .long, help: ArgumentHelp("Host directory (created if missing) shown writable at the same path: --bind PATH. Repeatable.", valueName: "path"))
    var writableDir: [String] = []

    @Option(name: .long, help: ArgumentHelp("Working directory inside (default: \(Sandbox.input), or \(Sandbox.output) without --input-root).", valueName: "dir"))
    var chdir: String?

    @Flag(name: .long, help: "Share the host's network (default: only a private loopback).")
    var network = false

    @Argument(parsing: .postTerminator, help: "The command and its arguments, after --.")
    var command: [String] = []

    /// Exit status of casfs run's own failures (as env(1) and timeout(1) do),
    /// so that they are not taken for the command's status.
    static let ownFailure: Int32 = 125

    func run() throws {
        let cleanup = RunCleanup()
        let signals = RunSignals()
        let status: Int32
        do {
            status = try runBlocking { [self] in
                try await Daemon.withSignals(Daemon.shutdownSignals, onSignal: { signals.received($0) }) {
                    try execute(cleanup, signals)
                }
            }
        } catch let e as RunSignals.Interrupted {
            cleanup.run()
            printError(e)
            throw ExitCode(128 + e.signal)
        } catch {
            cleanup.run()
            printError(error)
            throw ExitCode(RunCommand.ownFailure)
        }
        cleanup.run()
        if status != 0 { throw ExitCode(status) }
    }

    /// What the arguments ask for, checked before anything is created.
    struct Plan {
        var inputRoot: Digest?
        var sandbox: Sandbox
        /// Directories to create before the run (--writable-dir).
        var writableDirs: [String]
        /// Shallowest destination first, so that a bind inside another one is mounted after it.
        var binds: [SandboxBind]
        var output: String?
        var config: String?
        var chdir: String
    }

    func plan() throws -> Plan {
        guard !command.isEmpty else {
            throw CLIError("no command given (put it after --: casfs run --input-root HASH_SIZE -- CMD ARGS...)")
        }
        if mount != nil && config != nil {
            throw CLIError("--mount and --config exclude each other (--config is for the store casfs run mounts itself)")
        }
        var digest: Digest?
        if let inputRoot {
            guard let d = Digest(parsing: inputRoot) else {
                throw CLIError("--input-root '\(inputRoot)' is not a digest <64 lowercase hex>_<size>")
            }
            digest = d
        }
        let sandbox = try Sandbox()
        var dirs: [String] = []
        var binds: [SandboxBind] = []
        for w in writableDir {
            let path = URL(fileURLWithPath: absolute(w)).standardizedFileURL.path
            let inside = try SandboxBind.checkedDestination(path, spec: w, option: "--writable-dir")
            dirs.append(path)
            binds.append(SandboxBind(source: path, destination: inside, writable: true))
        }
        for (specs, option, writable) in [(bind, "--bind", true), (roBind, "--ro-bind", false)] {
            for spec in specs {
                let b = try SandboxBind.parse(spec, option: option, writable: writable)
                try b.checkSource(option: option)
                binds.append(b)
            }
        }
        var seen: Set<String> = []
        for b in binds where !seen.insert(b.destination).inserted {
            throw CLIError("two binds at \(b.destination): give each path inside once")
        }
        binds = binds.enumerated().sorted {
            let (l, r) = ($0.element.destination.split(separator: "/").count, $1.element.destination.split(separator: "/").count)
            return l != r ? l < r : $0.offset < $1.offset
        }.map(\.element)
        if let config, !FileManager.default.isReadableFile(atPath: config) {
            throw CLIError("--config \(config): no such readable file")
        }
        let cwd = chdir ?? (digest != nil ? Sandbox.input : Sandbox.output)
        guard cwd.hasPrefix("/") else { throw CLIError("--chdir \(cwd): give an absolute path inside the sandbox") }
        return Plan(inputRoot: digest, sandbox: sandbox, writableDirs: dirs, binds: binds, output: output.map(absolute),
                    config: config.map(absolute), chdir: cwd)
    }

    private func execute(_ cleanup: RunCleanup, _ signals: RunSignals) throws -> Int32 {
        let plan = try plan()
        let mountpoint = try prepareMount(plan, cleanup)
        try signals.checkInterrupted()

        var inputPath: String?
        if let d = plan.inputRoot {
            inputPath = try checkInputRoot(d, mount: mountpoint, temporary: cleanup.temporaryMountpoint != nil)
        }

        let output: String
        if let dir = plan.output {
            try makeDirectory(dir, what: "--output")
            output = dir
        } else {
            output = try cleanup.runDirectory() + "/out"
            try makeDirectory(output, what: "scratch output")
            cleanup.scratchOutput = output
        }
        for w in plan.writableDirs { try makeDirectory(w, what: "--writable-dir") }
        try signals.checkInterrupted()

        let spec = SandboxSpec(mount: mountpoint, inputRoot: inputPath, output: output, mounts: plan.binds.map { .bind($0) },
                               workingDirectory: plan.chdir, network: network, namesPaths: true)
        do {
            defer { signals.forward(to: nil) }
            try plan.sandbox.check(spec) { pid in signals.forward(to: { kill(pid, $0) }) }
        }
        try signals.checkInterrupted()
        // Standard streams are the caller's: the command may be interactive.
        let run = try plan.sandbox.start(spec, command: command, stdin: .inherit, stdout: .inherit, stderr: .inherit)
        signals.forward(to: { run.signal($0) })
        let result = run.wait()
        signals.forward(to: nil)
        // A bwrap that exited without the command's status failed itself: 125.
        return result.status
    }

    /// The mount to use: --mount, a running zero-config mount, or a temporary one.
    private func prepareMount(_ plan: Plan, _ cleanup: RunCleanup) throws -> String {
        if let mount {
            let path = absolute(mount)
            guard MountTable.isCasfsMount(path) else {
                throw CLIError("\(mount) is not a casfs mount (no user.casfs.stats attribute on it)")
            }
            return path
        }
        let data = DefaultConfig.dataDirectory()
        if plan.config == nil, let running = OpenStack.runningZeroConfigMount(dataDirectory: data) {
            return running
        }
        let dir = try cleanup.runDirectory() + "/mnt"
        try makeDirectory(dir, what: "temporary mount point")
        cleanup.temporaryMountpoint = dir
        // Read-only and short-lived: noopen spares every open of an input file
        // its round trip to the daemon (access times are refreshed at lookup).
        var args = ["mount", "--foreground", "--temporary", "-o", "ro,noopen", "--log-file", MountCommand.defaultLogFile()]
        if let config = plan.config { args += ["--config", config] }
        args.append(dir)
        do {
            cleanup.daemon = try BackgroundStart.spawnAndWait(arguments: args)
        } catch {
            let text = "\(error)"
            if plan.config == nil && text.hasPrefix("another casfs mount") {
                throw CLIError("\(text), and its mount point is not known: pass --mount MOUNTPOINT")
            }
            throw CLIError("cannot mount the store for the run: \(text)")
        }
        return dir
    }

    /// `<mount>/tree/<digest>` if it is a directory, else why not.
    private func checkInputRoot(_ d: Digest, mount: String, temporary: Bool) throws -> String {
        // The temporary mount's path means nothing to the user; its log does.
        let log = temporary ? MountCommand.defaultLogFile() : "the mount's log"
        var st = stat()
        guard stat(mount + "/tree", &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
            throw CLIError("\(mount) has no tree/ directory (a casfs mount without input-root support: remount it with this casfs)")
        }
        let path = "\(mount)/tree/\(d)"
        guard stat(path, &st) == 0 else {
            let e = errno
            let shown = temporary ? "tree/\(d)" : path
            switch e {
            case ENOENT:
                throw CLIError("input root \(d) is not in the store (\(shown): no such Directory blob)")
            case EIO:
                throw CLIError("input root \(d) is not a REAPI Directory (\(shown): input/output error; \(log) says why)")
            default:
                throw CLIError("input root \(d): \(shown): \(String(cString: strerror(e)))")
            }
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else {
            throw CLIError("input root \(d): \(path) is not a directory")
        }
        return path
    }

    private func makeDirectory(_ path: String, what: String) throws {
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) } catch {
            throw CLIError("\(what) \(path): cannot create it (\((error as NSError).localizedDescription))")
        }
    }
}

// MARK: signals

/// SIGINT, SIGTERM and SIGHUP are recorded and passed on to the sandbox, so
/// that casfs run always gets to clean up after it.
final class RunSignals: Sendable {
    private let state = Mutex<(signal: Int32, forward: (@Sendable (Int32) -> Void)?)>((0, nil))

    func received(_ sig: Int32) {
        let forward = state.withLock { s -> (@Sendable (Int32) -> Void)? in
            s.signal = sig
            return s.forward
        }
        forward?(sig)
    }

    /// Where signals go from now on; a signal that came before is passed on at once.
    func forward(to target: (@Sendable (Int32) -> Void)?) {
        let early = state.withLock { s -> Int32 in
            s.forward = target
            return s.signal
        }
        if early != 0 { target?(early) }
    }

    /// Throws when a signal came: the run stops before the sandbox starts.
    func checkInterrupted() throws {
        let s = state.withLock { $0.signal }
        if s != 0 { throw Interrupted(signal: s) }
    }

    struct Interrupted: Error, CustomStringConvertible {
        let signal: Int32
        var description: String { "interrupted by signal \(signal) before the command started" }
    }
}

// MARK: cleanup

/// What a run created, taken down again whatever happens: the temporary
/// mount (unmounted, its daemon waited for), the scratch output, the run's
/// temporary directory.
final class RunCleanup: @unchecked Sendable {
    private var directory: String?
    var temporaryMountpoint: String?
    var daemon: pid_t?
    var scratchOutput: String?

    /// The run's private temporary directory, created on first use.
    func runDirectory() throws -> String {
        if let directory { return directory }
        let base = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.hasPrefix("/") ? $0 : nil } ?? "/tmp"
        var template = Array("\(base)/casfs-run-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else {
            throw CLIError("cannot create a temporary directory in \(base): \(String(cString: strerror(errno)))")
        }
        let dir = String(cString: p)
        directory = dir
        return dir
    }

    func run() {
        if let mp = temporaryMountpoint {
            if let daemon { unmount(mp, daemon: daemon) }
            // Never recursive: if the unmount failed, the store stays untouched.
            if !MountTable.isMountPoint(mp) { rmdir(mp) }
            temporaryMountpoint = nil
            daemon = nil
        }
        if let out = scratchOutput {
            try? FileManager.default.removeItem(atPath: out)
            scratchOutput = nil
        }
        if let dir = directory {
            if rmdir(dir) != 0 && errno != ENOENT {
                printError("left \(dir) behind: \(String(cString: strerror(errno)))")
            }
            directory = nil
        }
    }

    /// Unmounts the temporary mount and waits for its daemon (which stops a
    /// private Redis it owns on the way out).
    private func unmount(_ mp: String, daemon: pid_t) {
        var unmounted = false
        for attempt in 0..<20 {
            if !MountTable.isMountPoint(mp) || Spawn.runQuietly(["fusermount3", "-u", mp]) == 0 {
                unmounted = true
                break
            }
            usleep(useconds_t(50_000 * (attempt + 1)))
        }
        if !unmounted {
            printError("\(mp) is busy: unmounting it lazily")
            _ = Spawn.runQuietly(["fusermount3", "-uz", mp])
        }
        if Spawn.wait(daemon, seconds: 30) != nil { return }
        printError("the mount daemon (pid \(daemon)) did not exit after the unmount: stopping it")
        kill(daemon, SIGTERM)
        if Spawn.wait(daemon, seconds: 10) != nil { return }
        kill(daemon, SIGKILL)
        _ = Spawn.wait(daemon, seconds: 5)
    }
}
