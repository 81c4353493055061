import Foundation
import Synchronization

/// What the runner asks of a sandbox: run `arguments` with exactly
/// `environment`, in `workingDirectory` of the exec root, stdout and stderr
/// into files, killed (the whole process group) at the deadline or when
/// cancelled.
public struct SandboxRequest: Sendable {
    /// The writable exec root on the host.
    public var execRoot: String
    /// Components of the working directory below the exec root.
    public var workingDirectory: [String]
    public var arguments: [String]
    public var environment: [(String, String)]
    public var stdoutPath: String
    public var stderrPath: String
    /// Seconds; nil: no limit.
    public var timeout: Double?
    /// Share the host's network (only when the worker allows it).
    public var network: Bool
}

/// How the command ended.
public enum SandboxOutcome: Sendable, Equatable {
    /// The command's exit status (128+N after a death by signal N).
    case exited(Int32)
    /// Killed at the deadline.
    case timedOut
    /// Killed because the lease went away or the worker stops.
    case cancelled
}

/// Lets the lease's owner stop a running command.
public final class Cancellation: Sendable {
    private let state = Mutex<(cancelled: Bool, group: pid_t?)>((false, nil))

    public init() {}

    public var isCancelled: Bool { state.withLock { $0.cancelled } }

    /// Kills the command's process group, now or as soon as it starts.
    public func cancel() {
        let group = state.withLock { s -> pid_t? in
            s.cancelled = true
            return s.group
        }
        if let group { kill(-group, SIGKILL) }
    }

    /// Records the running process group; false if already cancelled.
    func started(_ group: pid_t) -> Bool {
        state.withLock { s in
            s.group = group
            return !s.cancelled
        }
    }

    func ended() { state.withLock { $0.group = nil } }
}

public protocol ActionSandbox: Sendable {
    /// Runs the command; throws `WorkerFailure` when the sandbox itself
    /// cannot be set up (the command then never ran).
    func run(_ request: SandboxRequest, cancellation: Cancellation) throws(WorkerFailure) -> SandboxOutcome
}

/// The sandbox of `casfs run`: the command runs through `casfs run --mount
/// <the worker's mount> --bind <exec root>:/execroot --chdir
/// /execroot/<working directory>`, so it sees what casfs run shows (the
/// system read-only with secrets masked, the mount read-only at /cas, a
/// private /tmp, /dev, /proc; no capabilities; no network unless asked) plus
/// its writable exec root at `/execroot`.
public struct CasfsRunSandbox: ActionSandbox {
    public static let execRootInside = "/execroot"
    /// casfs run's exit status for its own errors.
    static let ownErrorStatus: Int32 = 125

    public let casfs: String
    public let mount: String

    public init(casfs: String, mount: String) {
        self.casfs = casfs
        self.mount = mount
    }

    public func run(_ request: SandboxRequest, cancellation: Cancellation) throws(WorkerFailure) -> SandboxOutcome {
        let inside = ([Self.execRootInside] + request.workingDirectory).joined(separator: "/")
        var argv = [casfs, "run", "--mount", mount, "--bind", "\(request.execRoot):\(Self.execRootInside)", "--chdir", inside]
        if request.network { argv.append("--network") }
        argv += ["--"] + request.arguments
        let env = request.environment.map { "\($0.0)=\($0.1)" }

        let out = open(request.stdoutPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let err = open(request.stderrPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        defer {
            if out >= 0 { close(out) }
            if err >= 0 { close(err) }
        }
        guard out >= 0, err >= 0 else {
            throw WorkerFailure(.internalError, "cannot create the action's stdout/stderr files in \(request.stdoutPath): \(errnoText())")
        }
        let pid = try ChildProcess.spawn(casfs, argv, environment: env, stdout: out, stderr: err)
        guard cancellation.started(pid) else {
            kill(-pid, SIGKILL)
            _ = ChildProcess.wait(pid, timeout: nil)
            cancellation.ended()
            return .cancelled
        }
        let status = ChildProcess.wait(pid, timeout: request.timeout)
        cancellation.ended()
        guard let status else {
            // The deadline: the whole group goes (casfs run, bwrap; the
            // sandbox's own processes die with bwrap's PID namespace).
            kill(-pid, SIGKILL)
            _ = ChildProcess.wait(pid, timeout: nil)
            return .timedOut
        }
        if cancellation.isCancelled { return .cancelled }
        if status == Self.ownErrorStatus, let said = Self.ownError(request.stderrPath) {
            throw WorkerFailure(.internalError, "the sandbox could not run the command: \(said)")
        }
        return .exited(status)
    }

    /// casfs run's own one-line error (`casfs: ...`) at the start of the
    /// stderr file, if that is all there is.
    static func ownError(_ path: String) -> String? {
        guard let data = FileManager.default.contents(atPath: path), data.count < 4096 else { return nil }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard text.hasPrefix("casfs: "), !text.contains("\n") else { return nil }
        return String(text.dropFirst(7))
    }
}

/// posix_spawn in a process group of its own, with stdin from /dev/null,
/// default signal handling and only the given descriptors.
enum ChildProcess {
    static func spawn(_ exe: String, _ argv: [String], environment: [String], stdout: Int32, stderr: Int32) throws(WorkerFailure) -> pid_t {
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attr, &none)
        var defaults = sigset_t()
        sigfillset(&defaults)
        sigdelset(&defaults, SIGKILL)
        sigdelset(&defaults, SIGSTOP)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setpgroup(&attr, 0)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        posix_spawn_file_actions_adddup2(&actions, stderr, 2)
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { strdup($0) } + [nil]
        defer {
            cArgs.forEach { free($0) }
            cEnv.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, &attr, cArgs, cEnv)
        guard rc == 0 else { throw WorkerFailure(.internalError, "cannot start \(exe): \(errnoText(rc))") }
        return pid
    }

    /// The exit status (128+N for signal N), or nil when `timeout` seconds
    /// passed first (the child is then still running).
    static func wait(_ pid: pid_t, timeout: Double?) -> Int32? {
        let deadline = timeout.map { Date().addingTimeInterval($0) }
        var pause: useconds_t = 1_000
        while true {
            var status: Int32 = 0
            let r = waitpid(pid, &status, deadline == nil ? 0 : WNOHANG)
            if r == pid {
                let sig = status & 0x7f
                return sig == 0 ? (status >> 8) & 0xff : 128 + sig
            }
            if r < 0 && errno != EINTR { return -1 }
            if let deadline {
                if Date() >= deadline { return nil }
                usleep(pause)
                pause = min(pause * 2, 10_000)
            }
        }
    }
}
