import CASCore
import Foundation
import REAPI
import Synchronization
import SwiftProtobuf

/// How a lease ended, for its status, result and the metrics.
public struct LeaseOutcome: Sendable {
    /// The lease's status: OK when the command ran (whatever its exit code),
    /// DEADLINE_EXCEEDED at the action's timeout, else a worker-side failure.
    public var status: RPCStatus
    public var result: REActionResult?
    /// One of `WorkerMetrics.outcomes`.
    public var outcome: String
}

/// Where the runner works, and what it may give an action.
public struct RunnerSettings: Sendable {
    /// The worker's casfs mount; input roots are `<mount>/tree/<digest>`.
    public var mount: String
    /// Where each action gets a scratch directory (local disk).
    public var scratchDirectory: String
    /// The worker's name in ExecutedActionMetadata.
    public var workerName: String
    /// Whether an action whose platform asks for `network=on` gets the host network.
    public var networkAllowed: Bool
    /// How an input root becomes the exec root.
    public var staging: InputStaging = .lazy

    public enum InputStaging: String, Sendable {
        /// The lazy `/tree` under an overlayfs scratch layer (the default).
        case lazy
        /// Downloaded whole to local disk first (a baseline for benchmarks).
        case download
    }

    public init(mount: String, scratchDirectory: String, workerName: String, networkAllowed: Bool) {
        self.mount = mount
        self.scratchDirectory = scratchDirectory
        self.workerName = workerName
        self.networkAllowed = networkAllowed
    }
}

/// Runs one lease's action on its lazy input root and returns its result:
/// reads the Action (from the lease, or by digest) and Command from the CAS,
/// mounts the exec root (the input root under a scratch layer), creates the
/// outputs' parent directories, runs the command in the sandbox with exactly
/// its arguments and environment, and sends outputs, stdout and stderr to the CAS.
public final class ActionRunner: Sendable {
    let settings: RunnerSettings
    /// Reads Actions and Commands (the mount's storage: the disk cache in
    /// front of the remote CAS).
    let fetch: any Storage
    /// Where outputs go (the remote CAS).
    let upload: any Storage
    let sandbox: any ActionSandbox
    let metrics: WorkerMetrics?
    private let counter = Atomic<Int>(0)

    public init(settings: RunnerSettings, fetch: any Storage, upload: any Storage, sandbox: any ActionSandbox,
                metrics: WorkerMetrics?) {
        self.settings = settings
        self.fetch = fetch
        self.upload = upload
        self.sandbox = sandbox
        self.metrics = metrics
    }

    /// Runs the action the lease carries. Blocking; call on a thread of its own.
    public func run(payload: Google_Protobuf_Any, cancellation: Cancellation) -> LeaseOutcome {
        let started = Date()
        var metadata = Build_Bazel_Remote_Execution_V2_ExecutedActionMetadata()
        metadata.worker = settings.workerName
        metadata.workerStartTimestamp = started.timestamp
        let outcome: LeaseOutcome
        do {
            outcome = try execute(payload, metadata: &metadata, cancellation: cancellation)
        } catch {
            log.error("action failed on the worker: \(error.message)")
            outcome = LeaseOutcome(status: error.status, result: nil,
                                   outcome: cancellation.isCancelled ? "handed_back" : "error")
        }
        metrics?.duration.record(.seconds(Date().timeIntervalSince(started)))
        metrics?.finished(outcome.outcome)
        return outcome
    }

    private func execute(_ payload: Google_Protobuf_Any, metadata: inout Build_Bazel_Remote_Execution_V2_ExecutedActionMetadata,
                         cancellation: Cancellation) throws(WorkerFailure) -> LeaseOutcome {
        metadata.inputFetchStartTimestamp = Date().timestamp
        let fetchStart = Date()
        let action = try self.action(payload)
        let command: RECommand = try message(action.commandDigest.checked("the Action's command_digest"), what: "Command")
        let inputRoot = try action.inputRootDigest.checked("the Action's input_root_digest")
        let paths = try CommandPaths(command)
        guard !command.arguments.isEmpty else { throw WorkerFailure(.invalidArgument, "the Command has no arguments") }

        let n = counter.add(1, ordering: .relaxed).newValue
        let scratch = "\(settings.scratchDirectory)/\(getpid())-\(n)"
        let execRoot: ExecRoot
        switch settings.staging {
        case .lazy:
            let lower = "\(settings.mount)/tree/\(inputRoot)"
            // The root Directory is read here (a stat through the mount); its
            // files only when the action reads them.
            var st = stat()
            guard stat(lower, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
                let e = errno
                throw WorkerFailure(.failedPrecondition, "the input root \(inputRoot) is missing from the CAS or is not a REAPI Directory (\(errnoText(e)))")
            }
            execRoot = try ExecRoot(lower: lower, scratch: scratch)
        case .download:
            execRoot = try ExecRoot(plainIn: scratch)
            do {
                try InputDownloader(storage: fetch).download(inputRoot, into: execRoot.root)
            } catch {
                execRoot.release()
                throw error
            }
        }
        defer { execRoot.release() }
        try execRoot.prepare(paths.directoriesToPrepare)
        metadata.inputFetchCompletedTimestamp = Date().timestamp
        metrics?.fetch.record(.seconds(Date().timeIntervalSince(fetchStart)))

        let network = Self.wantsNetwork(action, command)
        if network && !settings.networkAllowed {
            throw WorkerFailure(.failedPrecondition, "the action asks for network=on, which this worker does not offer (start it with --platform network=on)")
        }
        var timeout: Double?
        if action.hasTimeout {
            let t = Double(action.timeout.seconds) + Double(action.timeout.nanos) / 1e9
            guard t.isFinite, t >= 0 else { throw WorkerFailure(.invalidArgument, "the Action's timeout is negative") }
            if t > 0 { timeout = t }
        }
        let request = SandboxRequest(
            execRoot: execRoot.root, workingDirectory: paths.workingDirectory, arguments: command.arguments,
            environment: command.environmentVariables.map { ($0.name, $0.value) },
            stdoutPath: scratch + "/stdout", stderrPath: scratch + "/stderr", timeout: timeout, network: network)
        metadata.executionStartTimestamp = Date().timestamp
        let ran = try sandbox.run(request, cancellation: cancellation)
        metadata.executionCompletedTimestamp = Date().timestamp
        if ran == .cancelled {
            throw WorkerFailure(.unavailable, "the action was stopped before it finished (lease cancelled or worker stopping)")
        }

        metadata.outputUploadStartTimestamp = Date().timestamp
        var collected = try OutputCollector(root: execRoot.root, paths: paths).collect()
        var result = REActionResult()
        for (name, path) in [("stdout", request.stdoutPath), ("stderr", request.stderrPath)] {
            let d: Digest
            do { d = try FileSource(path: path).computeDigest() } catch {
                throw WorkerFailure(.internalError, "cannot read the action's \(name): \(error)")
            }
            collected.fileBlobs[d] = path
            if name == "stdout" { result.stdoutDigest = REDigest(d) } else { result.stderrDigest = REDigest(d) }
        }
        try ResultUploader(cas: upload, metrics: metrics).upload(files: collected.fileBlobs, data: collected.dataBlobs)
        metadata.outputUploadCompletedTimestamp = Date().timestamp

        result.outputFiles = collected.files
        result.outputDirectories = collected.directories
        result.outputSymlinks = collected.symlinks
        result.outputFileSymlinks = collected.fileSymlinks
        result.outputDirectorySymlinks = collected.directorySymlinks
        metadata.workerCompletedTimestamp = Date().timestamp
        var status = RPCStatus()
        let outcome: String
        switch ran {
        case .exited(let code):
            result.exitCode = code
            outcome = code == 0 ? "success" : "failure"
        case .timedOut:
            result.exitCode = 128 + SIGKILL
            status.code = StatusCode.deadlineExceeded.rawValue
            status.message = "the action ran past its timeout of \(timeout ?? 0) s and was killed"
            outcome = "timeout"
        case .cancelled:
            outcome = "handed_back"
        }
        result.executionMetadata = metadata
        return LeaseOutcome(status: status, result: result, outcome: outcome)
    }

    /// The Action in the payload, or the one its Digest names.
    private func action(_ payload: Google_Protobuf_Any) throws(WorkerFailure) -> REAction {
        if payload.isA(REAction.self) {
            do { return try REAction(unpackingAny: payload) } catch {
                throw WorkerFailure(.invalidArgument, "the lease's Action cannot be decoded: \(error)")
            }
        }
        if payload.isA(REDigest.self) {
            let d: REDigest
            do { d = try REDigest(unpackingAny: payload) } catch {
                throw WorkerFailure(.invalidArgument, "the lease's Action digest cannot be decoded: \(error)")
            }
            return try message(d.checked("the lease's Action digest"), what: "Action")
        }
        throw WorkerFailure(.invalidArgument, "the lease carries neither an Action nor its Digest (type \(payload.typeURL))")
    }

    /// A message read from the CAS by digest.
    private func message<M: SwiftProtobuf.Message>(_ digest: Digest, what: String) throws(WorkerFailure) -> M {
        let data: Data
        do {
            guard let source = try fetch.getBlob(digest) else {
                throw WorkerFailure(.failedPrecondition, "the \(what) \(digest) is missing from the CAS")
            }
            data = try source.readAll()
        } catch let e as WorkerFailure {
            throw e
        } catch {
            throw WorkerFailure(.unavailable, "cannot read the \(what) \(digest) from the CAS: \(error)")
        }
        guard Digest.of(data) == digest else {
            throw WorkerFailure(.failedPrecondition, "the \(what) \(digest) read from the CAS does not match its digest")
        }
        do { return try M(serializedBytes: data) } catch {
            throw WorkerFailure(.invalidArgument, "the \(what) \(digest) is not a REAPI \(what): \(error)")
        }
    }

    /// The platform property `network=on` (in the Action's or the Command's platform).
    static func wantsNetwork(_ action: REAction, _ command: RECommand) -> Bool {
        (action.platform.properties + command.platform.properties).contains { $0.name == "network" && $0.value == "on" }
    }
}
