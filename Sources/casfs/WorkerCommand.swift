import ArgumentParser
import CASConfig
import CASCore
import CASDaemon
import CASSandbox
import CASFuse
import CASProcess
import CASStorage
import CASWorker
import Foundation
import FuseKernel
import Logging
import MetricsServer
import RemoteCAS
import Synchronization

struct WorkerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker",
        abstract: "Run Bazel remote-execution actions from BuildGrid, each on its lazy casfs input root.",
        discussion: """
            A bot of BuildGrid's Bots API (google.devtools.remoteworkers.v1test2).
            It mounts the CAS once (a disk cache in --cache-dir in front of the
            remote CAS, read-only), and runs each action on
            <mount>/tree/<input root> under a writable overlayfs layer on local
            disk, in the sandbox of `casfs run`; outputs, stdout and stderr go
            to the CAS and the ActionResult back in the lease. Runs as root
            (it mounts). SIGTERM or SIGINT: no new leases, running actions may
            finish (--shutdown-grace), the rest are handed back; a second
            signal hands them back at once.
            """)

    @Option(name: .long, help: "The Bots service: http://, grpc:// (plaintext), https://, grpcs:// (TLS) host:port.")
    var server: String

    @Option(name: .long, help: "The CAS (default: --server).")
    var casServer: String?

    @Option(name: .long, help: "The instance name (default: the empty one).")
    var instanceName = ""

    @Option(name: .long, help: "Actions at once (default: the number of cores).")
    var jobs: Int?

    @Option(name: .long, help: "Disk cache, mount point and scratch space (default: $XDG_CACHE_HOME/casfs-worker, else ~/.cache/casfs-worker).")
    var cacheDir: String?

    @Option(name: .long, help: ArgumentHelp("A property reported to the scheduler, matched against actions' platforms (repeatable). OSFamily=linux unless given. network=on lets actions that ask for it use the host network.", valueName: "KEY=VALUE"))
    var platform: [String] = []

    @Option(name: .long, help: ArgumentHelp("Serve GET /metrics for Prometheus there: the mount's casfs_ metrics and the worker's.", valueName: "HOST:PORT"))
    var metrics: String?

    @Option(name: .long, help: "PEM file of the CA (or certificate) the servers' certificates are checked against, instead of the system's roots (TLS URLs).")
    var tlsServerCert: String?

    @Option(name: .long, help: "PEM private key of a client certificate (mutual TLS; with --tls-client-cert).")
    var tlsClientKey: String?

    @Option(name: .long, help: "PEM client certificate (mutual TLS; with --tls-client-key).")
    var tlsClientCert: String?

    @Option(name: .long, help: "File holding a token sent as `authorization: Bearer <token>` on every call (read again every --token-refresh-seconds).")
    var authToken: String?

    @Option(name: .long, help: "Seconds between reads of --auth-token (default 3600).")
    var tokenRefreshSeconds: Double?

    @Option(name: .long, help: "The bot's id (default: <host name>:<cache dir>; keep it stable across restarts).")
    var botId: String?

    @Option(name: .long, help: "Seconds running actions may take after SIGTERM before they are handed back (default 60).")
    var shutdownGrace: Double = 60

    /// `download`: stage each input root whole on local disk before the
    /// action starts, as workers without a lazy filesystem do (a baseline
    /// for bench/worker-*).
    @Option(name: .long, help: .hidden)
    var inputStaging = "lazy"

    @Flag(name: .shortAndLong, help: "Log debug messages.")
    var verbose = false

    func validate() throws {
        guard RunnerSettings.InputStaging(rawValue: inputStaging) != nil else {
            throw ValidationError("--input-staging must be lazy or download")
        }
        if let jobs, jobs < 1 || jobs > 4096 { throw ValidationError("--jobs must be between 1 and 4096") }
        guard shutdownGrace.isFinite, shutdownGrace >= 0, shutdownGrace <= 86_400 else {
            throw ValidationError("--shutdown-grace must be between 0 and 86400 seconds")
        }
        _ = try parsedPlatform()
        if let metrics { do { _ = try ListenAddress(parsing: metrics) } catch { throw ValidationError("--metrics: \(error)") } }
        for url in [server, casServer].compactMap({ $0 }) {
            do { _ = try RemoteStorage.Endpoint(url: url) } catch { throw ValidationError("\(url): \(error)") }
        }
    }

    /// The properties to report: `--platform` in order, OSFamily=linux first unless given.
    func parsedPlatform() throws -> [(String, String)] {
        var props: [(String, String)] = []
        for p in platform {
            guard let eq = p.firstIndex(of: "="), eq != p.startIndex else {
                throw ValidationError("--platform \(p): expected KEY=VALUE")
            }
            props.append((String(p[..<eq]), String(p[p.index(after: eq)...])))
        }
        if !props.contains(where: { $0.0 == "OSFamily" }) { props.insert(("OSFamily", "linux"), at: 0) }
        return props
    }

    static func defaultCacheDirectory() -> String {
        let env = ProcessInfo.processInfo.environment
        if let x = env["XDG_CACHE_HOME"], x.hasPrefix("/") { return x + "/casfs-worker" }
        let home = env["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? NSHomeDirectory()
        return home + "/.cache/casfs-worker"
    }

    var credentials: RemoteCredentials {
        RemoteCredentials(tlsServerCert: tlsServerCert.map(absolute), tlsClientKey: tlsClientKey.map(absolute),
                          tlsClientCert: tlsClientCert.map(absolute), authToken: authToken.map(absolute),
                          tokenRefreshSeconds: tokenRefreshSeconds)
    }

    func run() throws {
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = verbose ? .debug : .info
            return h
        }
        do {
            try serve()
        } catch let e as ExitCode {
            throw e
        } catch {
            printError(error)
            throw ExitCode.failure
        }
    }

    private func serve() throws {
        // Blobs come and go in megabytes: the allocator gives them back.
        MallocTuning.apply()
        let log = Logger(label: "casfs.worker")
        // A descriptor limit to match the actions' load; nothing it opens (gRPC's sockets included) reaches a child.
        Daemon.prepareProcess(log: log)
        let hygiene = Daemon.startDescriptorHygiene()
        defer { hygiene.cancel() }
        guard geteuid() == 0 else {
            throw CLIError("casfs worker must run as root: it mounts the CAS and an overlayfs exec root for each action")
        }
        let cache = absolute(cacheDir ?? Self.defaultCacheDirectory())
        let layout = try WorkerLayout(cache)
        let platform = try parsedPlatform()
        let capacity = jobs ?? ProcessInfo.processInfo.activeProcessorCount
        let casURL = casServer ?? server
        let botID = botId ?? "\(ProcessInfo.processInfo.hostName):\(cache)"

        try layout.writeStorageConfig(casURL: casURL, instanceName: instanceName, credentials: credentials)
        let stack = try OpenStack(configPath: layout.storageConfig)
        var stopStack = true
        defer { if stopStack { stack.close() } }
        try stack.storage.start()
        guard let remote = stack.stack.nodes["storage.fallback"] else {
            throw CLIError("internal: the worker's storage has no remote node")
        }
        let workerMetrics = WorkerMetrics(stack.metrics)
        let metricsServer = try metrics.map { try MetricsServer.start(try ListenAddress(parsing: $0), metrics: stack.metrics) }
        defer { metricsServer?.stop() }

        // The mount: read-only and open-less, served by threads of this process.
        var options = stack.stack.mount
        options.writable = false
        options.fsName = "casfs-worker"
        // Input directories are presented writable by their owner (0755): an
        // action may create files anywhere in its exec root, as in a local
        // sandbox; the writes land in the overlay's upper layer, never here.
        if options.treeDirectoryMode == nil { options.treeDirectoryMode = 0o755 }
        let fs = MountDaemon.fileSystem(stack: stack.stack, options: options, stagingDirectory: layout.scratch, log: log)
        let mount = try ServedMount.start(fs, mountpoint: layout.mount, log: log)
        stopStack = false
        defer {
            // Bounded: a lazily detached exec root still in use by a dying
            // sandbox keeps the FUSE connection alive; the process's exit
            // then ends it.
            let stopped = DispatchSemaphore(value: 0)
            let t = Thread {
                do { try mount.stop() } catch { log.error("unmounting \(layout.mount): \(error)") }
                stopped.signal()
            }
            t.start()
            if stopped.wait(timeout: .now() + 15) == .timedOut {
                log.warning("the mount on \(layout.mount) still had users 15 s after the unmount; exiting anyway")
            }
            stack.close()
        }
        guard mount.waitUntilReady(timeout: 60) else {
            throw CLIError("the CAS mount on \(layout.mount) did not come up")
        }
        log.info("CAS mounted on \(layout.mount)")

        // Fail closed: the sandbox is built and checked once before any lease.
        let sandbox = try BubblewrapSandbox(mount: layout.mount)
        let probe = layout.scratch + "/sandbox-check"
        try FileManager.default.createDirectory(atPath: probe, withIntermediateDirectories: true)
        do { try sandbox.check(execRoot: probe) } catch {
            throw CLIError("the action sandbox cannot be built: \(error)")
        }
        rmdir(probe)
        var runnerSettings = RunnerSettings(mount: layout.mount, scratchDirectory: layout.scratch, workerName: botID,
                                            networkAllowed: platform.contains { $0.0 == "network" && $0.1 == "on" })
        runnerSettings.staging = RunnerSettings.InputStaging(rawValue: inputStaging) ?? .lazy
        let runner = ActionRunner(
            settings: runnerSettings,
            fetch: stack.storage, upload: remote, sandbox: sandbox,
            metrics: workerMetrics)
        let client = try RemoteChannel.client(url: server, credentials: credentials)
        var settings = BotSettings(instanceName: instanceName, botID: botID, capacity: capacity, properties: platform)
        settings.shutdownGrace = shutdownGrace
        let bot = BotWorker(client: client, settings: settings, runner: runner, metrics: workerMetrics)

        let connections = Task.detached { try? await client.runConnections() }
        let stopper = Daemon.onSignals([.sigterm, .sigint]) { _ in bot.stop() }
        defer { stopper.cancel() }
        log.info("casfs worker \(botID): \(capacity) at once, platform \(platform.map { "\($0.0)=\($0.1)" }.joined(separator: ",")), scheduler \(server), CAS \(casURL), instance '\(instanceName)', mount \(layout.mount)")
        let done = DispatchSemaphore(value: 0)
        Task.detached {
            await bot.run()
            done.signal()
        }
        done.wait()
        client.beginGracefulShutdown()
        connections.cancel()
    }
}

/// Where the worker keeps things, under its cache directory: `cas/` (the
/// disk cache), `mnt/` (the casfs mount), `scratch/` (each action's upper
/// layer, stdout and stderr), `storage.yaml` (the storage configuration it
/// mounts), `worker.lock` (one worker per cache directory).
struct WorkerLayout {
    let root: String
    var mount: String { root + "/mnt" }
    var scratch: String { root + "/scratch" }
    var store: String { root + "/cas" }
    var storageConfig: String { root + "/storage.yaml" }
    private let lock: Int32

    init(_ root: String) throws {
        self.root = root
        for c in [",", ":", "\\", "\n"] where root.contains(c) {
            throw CLIError("the cache directory \(root) may not contain '\(c)' (overlayfs options cannot name it)")
        }
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        lock = open(root + "/worker.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard lock >= 0 else { throw CLIError("cannot open \(root)/worker.lock: \(String(cString: strerror(errno)))") }
        guard flock(lock, LOCK_EX | LOCK_NB) == 0 else {
            throw CLIError("another casfs worker uses the cache directory \(root)")
        }
        // What a worker killed before it could clean up left behind.
        if MountTable.isMountPoint(mount) { FuseMount.detach(mount) }
        if let left = try? FileManager.default.contentsOfDirectory(atPath: scratch) {
            for dir in left where MountTable.isMountPoint(scratch + "/" + dir + "/root") {
                _ = umount2(scratch + "/" + dir + "/root", Int32(MNT_DETACH))
            }
        }
        ScratchCleaner.remove(scratch)
        for dir in [mount, scratch, store] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
    }

    /// The storage the worker mounts: the disk cache in front of the remote CAS.
    func writeStorageConfig(casURL: String, instanceName: String, credentials: RemoteCredentials) throws {
        func q(_ s: String) -> String {
            var out = "\""
            for u in s.unicodeScalars {
                switch u {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                default:
                    if u.value < 0x20 { out += String(format: "\\x%02x", u.value) } else { out.unicodeScalars.append(u) }
                }
            }
            return out + "\""
        }
        var text = """
            # Written by casfs worker at each start.
            storage: !with-cache-storage
              cache: !disk-storage
                path: \(q(store))
              fallback: !remote-storage
                url: \(q(casURL))
                instance-name: \(q(instanceName))

            """
        var creds: [String] = []
        if let v = credentials.tlsServerCert { creds.append("tls-server-cert: \(q(v))") }
        if let v = credentials.tlsClientKey { creds.append("tls-client-key: \(q(v))") }
        if let v = credentials.tlsClientCert { creds.append("tls-client-cert: \(q(v))") }
        if let v = credentials.authToken { creds.append("auth-token: \(q(v))") }
        if let v = credentials.tokenRefreshSeconds { creds.append("token-refresh-seconds: \(v)") }
        if !creds.isEmpty {
            text += "    credentials:\n" + creds.map { "      \($0)\n" }.joined()
        }
        text += """
            mount:
              writable: false
              tree-prefetch: true

            """
        try text.write(toFile: storageConfig, atomically: true, encoding: .utf8)
    }
}

enum ScratchCleaner {
    /// Removes `path` and everything below it (as rm -rf --one-file-system does, at any depth).
    static func remove(_ path: String) {
        do { try TreeRemover.remove(path) } catch {
            FileHandle.standardError.write(Data("casfs: \(error)\n".utf8))
        }
    }
}
