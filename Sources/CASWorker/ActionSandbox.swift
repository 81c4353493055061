import CASSandbox
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
    private let state = Mutex<(cancelled: Bool, stop: (@Sendable () -> Void)?)>((false, nil))

    public init() {}

    public var isCancelled: Bool { state.withLock { $0.cancelled } }

    /// Stops the command, now or as soon as it starts.
    public func cancel() {
        let stop = state.withLock { s -> (@Sendable () -> Void)? in
            s.cancelled = true
            return s.stop
        }
        stop?()
    }

    /// Records how to stop the running command; false if already cancelled.
    func started(_ stop: @escaping @Sendable () -> Void) -> Bool {
        state.withLock { s in
            s.stop = stop
            return !s.cancelled
        }
    }

    func ended() { state.withLock { $0.stop = nil } }
}

public protocol ActionSandbox: Sendable {
    /// Runs the command; throws `WorkerFailure` when the sandbox itself
    /// cannot be set up (the command then never ran).
    func run(_ request: SandboxRequest, cancellation: Cancellation) throws(WorkerFailure) -> SandboxOutcome
}

/// The sandbox of `casfs run` (CASSandbox): the command sees the system
/// read-only with secrets masked, the worker's mount read-only at /cas, a
/// private /tmp, /dev and /proc, no capabilities, no network unless asked,
/// and its writable exec root at `/execroot`, where it starts in the
/// working directory. Killing bwrap ends the whole sandbox (its PID namespace).
public struct BubblewrapSandbox: ActionSandbox {
    public static let execRootInside = "/execroot"

    let sandbox: Sandbox
    public let mount: String

    public init(mount: String) throws {
        sandbox = try Sandbox()
        self.mount = mount
    }

    func spec(_ request: SandboxRequest) -> SandboxSpec {
        var env: [String: String] = [:]
        for (k, v) in request.environment { env[k] = v }
        return SandboxSpec(
            mount: mount,
            mounts: [.bind(SandboxBind(source: request.execRoot, destination: Self.execRootInside, writable: true))],
            workingDirectory: ([Self.execRootInside] + request.workingDirectory).joined(separator: "/"),
            network: request.network, environment: env, namesPaths: false)
    }

    /// Fail closed, once: builds the sandbox around `execRoot` (an empty
    /// directory) and checks that nothing inside keeps a privilege.
    public func check(execRoot: String) throws {
        try sandbox.check(spec(SandboxRequest(execRoot: execRoot, workingDirectory: [], arguments: ["true"],
                                               environment: [], stdoutPath: "", stderrPath: "", timeout: nil,
                                               network: false)))
    }

    public func run(_ request: SandboxRequest, cancellation: Cancellation) throws(WorkerFailure) -> SandboxOutcome {
        let run: SandboxRun
        do {
            run = try sandbox.start(spec(request), command: request.arguments, stdin: .null,
                                    stdout: .file(request.stdoutPath), stderr: .file(request.stderrPath))
        } catch {
            throw WorkerFailure(.internalError, "the sandbox could not start: \(error)")
        }
        guard cancellation.started({ run.kill() }) else {
            run.kill()
            _ = run.wait()
            cancellation.ended()
            return .cancelled
        }
        let result = run.wait(timeout: request.timeout)
        cancellation.ended()
        if result.timedOut { return .timedOut }
        if cancellation.isCancelled { return .cancelled }
        if !result.started {
            // bwrap said why on the command's stderr. A command that cannot
            // be started is the action's failure (as a shell's 127); anything
            // else is the sandbox's.
            let said = (FileManager.default.contents(atPath: request.stderrPath)).map { String(decoding: $0.prefix(4096), as: UTF8.self) } ?? ""
            if said.contains("execvp") { return .exited(127) }
            throw WorkerFailure(.internalError, "the sandbox could not be set up: \(said.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return .exited(result.status)
    }
}
