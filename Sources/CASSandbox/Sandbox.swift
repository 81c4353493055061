import CASProcess
import Foundation
import Synchronization

/// Runs commands in the bubblewrap sandbox that `SandboxSpec` describes:
/// the sandbox of `casfs run`, usable from library code.
///
///     let sandbox = try Sandbox()
///     try sandbox.check(spec)                       // fail closed, once per spec shape
///     let run = try sandbox.start(spec, command: ["sh", "-c", "make"],
///                                 stdout: .file("/w/stdout"), stderr: .file("/w/stderr"))
///     let result = run.wait(timeout: 600)           // kills the whole sandbox at the deadline
///
/// bwrap runs with default signal dispositions, an empty signal mask and no
/// descriptor of this process but the command's stdin, stdout and stderr
/// (a descriptor the caller left open never reaches the command), in a
/// process group of its own. Killing bwrap ends the whole sandbox: its
/// first process dies with it (`--die-with-parent`), and the kernel kills
/// every process of a PID namespace whose first process died.
public final class Sandbox: Sendable {
    /// The bwrap executable.
    public let bwrap: String

    /// Uses `bwrap` (nil: the one on PATH); throws if there is none.
    public init(bwrap: String? = nil) throws {
        if let bwrap {
            guard access(bwrap, X_OK) == 0 else { throw SandboxError("\(bwrap) is not an executable") }
            self.bwrap = bwrap
        } else {
            guard let found = Spawn.findExecutable("bwrap") else {
                throw SandboxError("bwrap not found in PATH: install the bubblewrap package (apt-get install bubblewrap)")
            }
            self.bwrap = found
        }
    }

    /// Where a standard stream of the command goes or comes from.
    public enum Stream: Sendable, Equatable {
        /// This process's own.
        case inherit
        /// /dev/null.
        case null
        /// A descriptor of this process (the caller keeps and closes it).
        case descriptor(Int32)
        /// A file: read for stdin; created (0644) or truncated for stdout and stderr.
        case file(String)
    }

    /// Fail closed: runs `cat /proc/self/status` in the same sandbox. If
    /// bwrap cannot build it (namespaces it may not create, a path it cannot
    /// bind, a bwrap too old for an option), its message becomes the error;
    /// if the process inside would keep any capability or lack
    /// no_new_privs, the error says so. `started` gets the check's pid (to
    /// pass a signal on).
    public func check(_ spec: SandboxSpec, started: ((pid_t) -> Void)? = nil) throws {
        try spec.validate()
        try SandboxCheck.run(bwrap: bwrap, arguments: spec.bwrapArguments, started: started ?? { _ in })
    }

    /// Starts `command` (argv; argv[0] looked up in the sandbox's PATH) in
    /// the sandbox and returns at once.
    public func start(_ spec: SandboxSpec, command: [String], stdin: Stream = .null, stdout: Stream = .inherit,
                      stderr: Stream = .inherit) throws -> SandboxRun {
        guard !command.isEmpty else { throw SandboxError("no command given") }
        try spec.validate()
        var opened: [Int32] = []
        defer { for fd in opened { close(fd) } }
        func stream(_ s: Stream, input: Bool) throws -> Spawn.Stream {
            switch s {
            case .inherit: return .inherit
            case .null: return .null
            case .descriptor(let fd): return .descriptor(fd)
            case .file(let path):
                let flags = input ? O_RDONLY : (O_WRONLY | O_CREAT | O_TRUNC)
                let fd = open(path, flags | O_CLOEXEC | O_NOCTTY, 0o644)
                guard fd >= 0 else { throw SandboxError("\(path): \(String(cString: strerror(errno)))") }
                opened.append(fd)
                return .descriptor(fd)
            }
        }
        let status = try ChildOutputPipe()
        let statusFD: Int32 = 3
        let argv = [bwrap] + spec.bwrapArguments + ["--json-status-fd", "\(statusFD)", "--"] + command
        let pid: pid_t
        switch Spawn.start(bwrap, argv, environment: spec.environment,
                           stdin: try stream(stdin, input: true), stdout: try stream(stdout, input: false),
                           stderr: try stream(stderr, input: false), descriptors: [statusFD: status.writeEnd],
                           processGroup: true) {
        case .success(let p): pid = p
        case .failure(let e): throw SandboxError("\(e)")
        }
        status.closeWriteEnd()
        return SandboxRun(pid: pid, status: status)
    }

    /// Starts `command` and waits for it (see `SandboxRun.wait`).
    public func run(_ spec: SandboxSpec, command: [String], stdin: Stream = .null, stdout: Stream = .inherit,
                    stderr: Stream = .inherit, timeout: Double? = nil) throws -> SandboxResult {
        try start(spec, command: command, stdin: stdin, stdout: stdout, stderr: stderr).wait(timeout: timeout)
    }
}

/// How a sandboxed command ended.
public struct SandboxResult: Sendable, Equatable {
    /// How bwrap ended: the command's exit status or signal when `started`.
    public var termination: Termination
    /// The command was started (bwrap reported it); false: bwrap failed
    /// before (it said why on the command's stderr).
    public var started: Bool
    /// The deadline passed and the sandbox was killed.
    public var timedOut: Bool

    public init(termination: Termination, started: Bool, timedOut: Bool) {
        self.termination = termination
        self.started = started
        self.timedOut = timedOut
    }

    /// The shell's convention for the command: exit status, or 128+N for signal N.
    public var status: Int32 { termination.status }
}

/// A command running in a sandbox.
public final class SandboxRun: @unchecked Sendable {
    /// bwrap's pid (the leader of the sandbox's process group).
    public let pid: pid_t
    private let handle: ProcessHandle?
    private let state = Mutex<(status: ChildOutputPipe?, result: SandboxResult?)>((nil, nil))

    init(pid: pid_t, status: ChildOutputPipe) {
        self.pid = pid
        self.handle = ProcessHandle(pid: pid)
        state.withLock { $0.status = status }
    }

    /// Passes `signal` to bwrap (until it has been waited for).
    public func signal(_ signal: Int32) {
        if let handle { handle.signal(signal) } else if state.withLock({ $0.result == nil }) { _ = Glibc.kill(pid, signal) }
    }

    /// Kills the whole sandbox now.
    public func kill() {
        signal(SIGKILL)
    }

    /// Waits for the command to end, at most `timeout` seconds (nil: no
    /// limit): past it, the whole sandbox is killed and the result says
    /// `timedOut`. Call from one thread; later calls return the same result.
    public func wait(timeout: Double? = nil) -> SandboxResult {
        if let r = state.withLock({ $0.result }) { return r }
        var timedOut = false
        var end: Termination?
        if let timeout {
            if let handle {
                if !handle.waitForExit(timeout: max(0, timeout)) {
                    timedOut = true
                    kill()
                }
            } else {
                // Without a pidfd: poll (and reap) the child.
                end = Spawn.wait(pid, seconds: max(0, timeout))
                if end == nil {
                    timedOut = true
                    kill()
                }
            }
        }
        let ended = end ?? Spawn.waitForTermination(pid) ?? .exited(125)
        let report = state.withLock { s -> String in
            defer { s.status = nil }
            return s.status.map { String(decoding: $0.readAll(untilEndOfFile: false), as: UTF8.self) } ?? ""
        }
        let started = report.contains("\"child-pid\"")
        var termination = ended
        if case .exited = ended, !report.contains("\"exit-code\"") {
            // bwrap exited without reporting the command's status: its own failure.
            termination = .exited(125)
        }
        let result = SandboxResult(termination: termination, started: started, timedOut: timedOut)
        state.withLock { $0.result = result }
        return result
    }
}
