import CASFuse
import Foundation
import FuseKernel
import Logging
import ServiceLifecycle
import Synchronization

/// A `CASFileSystem` served on a mount point: the kernel mount, and the
/// request loop on threads of its own until the mount goes away (an
/// unmount from outside, or `unmount()`).
///
///     let served = try ServedMount.start(fs, mountpoint: "/mnt/cas", log: log)
///     served.waitUntilReady(timeout: 10)
///     ...
///     served.stop()          // detaches the mount, joins the request threads, frees the session
public final class ServedMount: Sendable {
    /// The mount point, symlinks resolved.
    public let mountpoint: String
    private let mount: FuseMount
    private let log: Logger
    private let ready = DispatchSemaphore(value: 0)
    private let isReady = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    private let outcome = Mutex<(done: Bool, error: (any Error)?)>((false, nil))
    private let closed = Atomic<Bool>(false)

    /// Mounts `fileSystem` on `mountpoint` (a failure to mount throws) and
    /// starts serving it. `ready` runs once the kernel has initialised the
    /// connection (the mount answers from then on).
    public static func start(_ fileSystem: CASFileSystem, mountpoint: String, log: Logger,
                             ready: (@Sendable () -> Void)? = nil) throws -> ServedMount {
        // Resolve before mounting: afterwards a stat of the path would wait
        // for this very daemon, whose loop has not started yet.
        let resolved = URL(fileURLWithPath: mountpoint).resolvingSymlinksInPath().path
        let mount = try FuseMount(mountpoint: resolved, options: fileSystem.kernelMountOptions())
        let served = ServedMount(mountpoint: resolved, mount: mount, log: log)
        fileSystem.whenReady {
            served.isReady.store(true, ordering: .sequentiallyConsistent)
            served.ready.signal()
            ready?()
        }
        fileSystem.raiseReadAhead(resolvedMountpoint: resolved)
        var trace: (@Sendable (String) -> Void)?
        if ProcessInfo.processInfo.environment["CASFS_FUSE_DEBUG"] != nil {
            trace = { (line: String) in log.info("fuse: \(line)") }
        }
        let logError: @Sendable (String) -> Void = { (line: String) in log.error("\(line)") }
        let session = FuseSession(fd: mount.fd, fileSystem: fileSystem, threads: fileSystem.requestThreads,
                                  maxWrite: 1 << 20, log: logError, trace: trace)
        log.info("serving \(mountpoint) (\(fileSystem.kernelMountOptions()), \(fileSystem.requestThreads) threads)")
        let t = Thread {
            var failure: (any Error)?
            do { try session.run() } catch { failure = error }
            served.outcome.withLock { $0 = (true, failure) }
            served.ready.signal()  // wake a waiter for readiness that will never come
            served.finished.signal()
        }
        t.name = "casfs-fuse-0"
        t.stackSize = 1 << 20
        t.start()
        return served
    }

    private init(mountpoint: String, mount: FuseMount, log: Logger) {
        self.mountpoint = mountpoint
        self.mount = mount
        self.log = log
    }

    /// Waits up to `timeout` seconds for the kernel's INIT; false if it did
    /// not come (or the loop ended first).
    @discardableResult
    public func waitUntilReady(timeout: Double) -> Bool {
        if isReady.load(ordering: .sequentiallyConsistent) { return true }
        _ = ready.wait(timeout: .now() + timeout)
        ready.signal()  // let other waiters through too
        return isReady.load(ordering: .sequentiallyConsistent)
    }

    /// True until the request loop has ended.
    public var isServing: Bool { !outcome.withLock { $0.done } }

    /// Detaches the mount, which ends the request loop (the kernel answers
    /// further requests with ENODEV). Returns at once; see `wait()`.
    public func unmount() {
        guard isServing else { return }
        log.info("unmounting \(mountpoint)")
        FuseMount.detach(mountpoint)
    }

    /// Waits for the request loop to end (after an unmount), then frees the
    /// session. Throws what ended the loop if it was not an unmount.
    public func wait() throws {
        finished.wait()
        finished.signal()
        if !closed.exchange(true, ordering: .sequentiallyConsistent) {
            mount.close()
        }
        if let error = outcome.withLock({ $0.error }) { throw error }
    }

    /// `unmount()`, then `wait()`.
    public func stop() throws {
        unmount()
        try wait()
    }
}

/// Serves a `CASFileSystem` on a mount point as a service: mounts when the
/// group starts it; on graceful shutdown (or cancellation) detaches the
/// mount and joins the request loop. When the mount goes away from outside
/// (`fusermount3 -u`), `run()` returns: add it with `Daemon.essential` so
/// that the rest of the group stops too.
public struct MountService: Service {
    public let fileSystem: CASFileSystem
    public let mountpoint: String
    private let log: Logger
    private let ready: (@Sendable () -> Void)?
    private let unmounted: (@Sendable () -> Void)?
    private let shared: Shared

    final class Shared: Sendable {
        let served = Mutex<ServedMount?>(nil)
        let started = DispatchSemaphore(value: 0)
        let failed = Atomic<Bool>(false)
    }

    /// - Parameters:
    ///   - ready: runs once the mount answers (the kernel's INIT).
    ///   - unmounted: runs once the mount is gone and its request loop has ended.
    public init(fileSystem: CASFileSystem, mountpoint: String, log: Logger, ready: (@Sendable () -> Void)? = nil,
                unmounted: (@Sendable () -> Void)? = nil) {
        self.fileSystem = fileSystem
        self.mountpoint = mountpoint
        self.log = log
        self.ready = ready
        self.unmounted = unmounted
        self.shared = Shared()
    }

    /// The mount, once the service has made it.
    public var served: ServedMount? { shared.served.withLock { $0 } }

    /// Blocks until the mount answers; false if it failed or did not
    /// within `timeout` seconds. For callers outside the group.
    public func waitUntilReady(timeout: Double) -> Bool {
        let end = Date().addingTimeInterval(timeout)
        guard shared.started.wait(timeout: .now() + timeout) == .success else { return false }
        shared.started.signal()
        guard let served = shared.served.withLock({ $0 }) else { return false }
        return served.waitUntilReady(timeout: max(0, end.timeIntervalSinceNow))
    }

    public func run() async throws {
        let served: ServedMount
        do {
            served = try await runOnThread(name: "casfs-mount") { [fileSystem, mountpoint, log, ready] in
                try ServedMount.start(fileSystem, mountpoint: mountpoint, log: log, ready: ready)
            }
        } catch {
            shared.failed.store(true, ordering: .sequentiallyConsistent)
            shared.started.signal()
            throw error
        }
        shared.served.withLock { $0 = served }
        shared.started.signal()
        defer { unmounted?() }
        try await withTaskCancellationOrGracefulShutdownHandler {
            try await runOnThread(name: "casfs-mount-wait") { try served.wait() }
        } onCancelOrGracefulShutdown: {
            let t = Thread { served.unmount() }
            t.name = "casfs-unmount"
            t.start()
        }
    }
}
