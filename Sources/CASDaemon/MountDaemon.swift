import CASConfig
import CASCore
import CASFuse
import CASStorage
import Foundation
import Logging
import ServiceLifecycle

/// What `casfs mount --foreground` runs, as a library: a storage stack
/// served on a mount point with its companions, as one service group —
/// the stack (and a zero-config mount's private Redis and its watchdog),
/// the metrics server (with `metrics-address`), the background reindex of
/// a zero-config store, and the mount. SIGTERM, SIGINT, SIGHUP or an
/// unmount from outside stop them all, the mount first and the storage last.
public final class MountDaemon: Sendable {
    public let stack: OpenStack
    public let fileSystem: CASFileSystem
    public let mountpoint: String
    public let metrics: MetricsService?
    public let reindex: BackgroundReindex?
    private let temporary: Bool
    private let log: Logger

    /// Starts the storage, binds the metrics address and makes the file
    /// system; nothing is mounted yet. On failure the stack is closed.
    /// - Parameters:
    ///   - options: the mount options (the stack's, with overrides applied).
    ///   - temporary: a mount for one run: not recorded as the data
    ///     directory's mount for other commands to find.
    public init(stack: OpenStack, options: MountOptions, mountpoint: String, stagingDirectory: String,
                temporary: Bool = false, log: Logger) throws {
        self.stack = stack
        self.mountpoint = mountpoint
        self.temporary = temporary
        self.log = log
        do {
            try stack.storage.start()
            // GET /metrics for Prometheus, with `metrics-address`.
            metrics = try options.metricsAddress.map { try MetricsService.bind($0, metrics: stack.metrics) }
        } catch {
            stack.close()
            throw error
        }
        fileSystem = MountDaemon.fileSystem(stack: stack.stack, options: options, stagingDirectory: stagingDirectory, log: log)
        if let data = stack.dataDirectory, let index = stack.index {
            // A partly lost index (Redis data lost under load) is repaired in
            // the background: blobs on disk it lacks come back.
            reindex = BackgroundReindex(index: index, name: data, log: log)
        } else {
            reindex = nil
        }
    }

    /// The file system over `stack` as `casfs mount` makes it: df shows the
    /// free space of its disk stores, passthrough stacks as deep as they
    /// need, reads refresh access times in the index.
    public static func fileSystem(stack: StorageStack, options: MountOptions, stagingDirectory: String,
                                  log: Logger) -> CASFileSystem {
        var options = options
        var recorder: (@Sendable (Digest) -> Void)?
        if let batcher = stack.accessTimes {
            recorder = { @Sendable (d: Digest) in batcher.record(d) }
        }
        // df shows the free space of the disk stores, where blobs land.
        let stores = stack.nodes.values.compactMap { ($0 as? DiskStorage)?.root }.sorted()
        // A store on overlayfs needs a deeper stack for passthrough.
        options.passthroughStackDepth = PassthroughDepth.required(forFilesUnder: stores)
        if options.passthroughStackDepth > 1 && options.passthrough && !options.isOpenless {
            log.info("the store is on a stacked filesystem (overlayfs): passthrough with max_stack_depth 2, so no overlayfs can be stacked on this mount")
        }
        return CASFileSystem(storage: stack.storage, index: stack.index, options: options,
                             stagingDirectory: stagingDirectory, spaceDirectories: stores, recordAccess: recorder,
                             metrics: stack.metrics)
    }

    /// The services, in start order (stopped in reverse).
    public func services(ready: (@Sendable () -> Void)? = nil) -> [ServiceGroupConfiguration.ServiceConfiguration] {
        let reindex = self.reindex
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [
            // A private Redis that dies is started again, and the entries it
            // had not yet written to its append-only file come back by a reindex.
            Daemon.essential(StoreService(stack, log: log) { reindex?.request() }, name: "storage"),
        ]
        if let metrics { services.append(Daemon.essential(metrics, name: "metrics")) }
        if let reindex { services.append(Daemon.essential(ReindexService(reindex), name: "reindex")) }
        // A zero-config mount tells other commands (casfs run) where it is.
        let record = stack.mountPointRecorder(temporary ? nil : mountpoint)
        let stack = self.stack
        services.append(Daemon.essential(MountService(fileSystem: fileSystem, mountpoint: mountpoint, log: log, ready: {
            record?()
            ready?()
        }, unmounted: {
            // The store is no longer recorded as served: a new mount waits
            // for this daemon to finish instead of being turned away.
            stack.withdrawMountPoint()
        }), name: "mount"))
        return services
    }

    /// Serves until unmounted or signalled, then stops everything. `ready`
    /// runs once the mount answers.
    public func run(ready: (@Sendable () -> Void)? = nil) async throws {
        // Paths are absolute from here on: do not keep the starting directory busy.
        _ = chdir("/")
        try await Daemon.group(services(ready: ready), log: log).run()
    }
}
