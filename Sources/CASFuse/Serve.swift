import CASCore
import Foundation
import FuseKernel
import Synchronization

public enum ServeError: Error, CustomStringConvertible {
    case deadMountpoint(String)

    public var description: String {
        switch self {
        case .deadMountpoint(let mp):
            return "\(mp) is a dead FUSE mount (its daemon exited): unmount it with `fusermount3 -u \(mp)`, then mount again"
        }
    }
}

extension CASFileSystem {
    /// The kernel mount options.
    public func kernelMountOptions() -> String {
        var o = ["fsname=\(options.fsName)", "subtype=casfs", "default_permissions",
                 "max_read=\(options.maxRead)", options.writable ? "rw" : "ro"]
        if options.allowOther { o.append("allow_other") }
        return o.joined(separator: ",")
    }

    /// Request threads: enough that a read waiting on a remote does not stall
    /// the others.
    var requestThreads: Int { options.threads > 0 ? options.threads : max(4, 2 * ProcessInfo.processInfo.activeProcessorCount) }

    /// Mounts on `mountpoint` and serves requests until unmounted
    /// (`fusermount3 -u`) or SIGINT/SIGTERM/SIGHUP. `ready` runs once the
    /// kernel has initialised the connection. Blocks the calling thread.
    public func serve(mountpoint: String, ready: @escaping @Sendable () -> Void) throws {
        // Resolve before mounting: afterwards a stat of the path would wait
        // for this very daemon, whose loop has not started yet.
        let resolved = URL(fileURLWithPath: mountpoint).resolvingSymlinksInPath().path
        whenReady(ready)
        let mount = try FuseMount(mountpoint: resolved, options: kernelMountOptions())
        defer { mount.close() }
        raiseReadAhead(resolvedMountpoint: resolved)
        let stopper = SignalUnmounter(mountpoint: resolved)
        defer { stopper.cancel() }

        var trace: (@Sendable (String) -> Void)?
        if ProcessInfo.processInfo.environment["CASFS_FUSE_DEBUG"] != nil {
            trace = { (line: String) in log.info("fuse: \(line)") }
        }
        let logError: @Sendable (String) -> Void = { (line: String) in log.error("\(line)") }
        let session = FuseSession(fd: mount.fd, fileSystem: self, threads: requestThreads, maxWrite: 1 << 20,
                                  log: logError, trace: trace)
        log.info("serving \(mountpoint) (\(kernelMountOptions()), \(requestThreads) threads)")
        try session.run()
        log.info("unmounting \(mountpoint)")
    }

    /// Page-cache readahead of a FUSE mount defaults to 128 KiB; raise it to the
    /// request size so sequential reads arrive in large requests. Best effort.
    func raiseReadAhead(resolvedMountpoint real: String) {
        guard let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return }
        // Last matching line: the mount just made.
        var devid: String?
        for line in info.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count > 4 else { continue }
            let mp = f[4].replacingOccurrences(of: "\\040", with: " ")
            if mp == real { devid = String(f[2]) }
        }
        guard let devid else { return }
        let kb = max(128, options.maxRead / 1024)
        let path = "/sys/class/bdi/\(devid)/read_ahead_kb"
        if (try? "\(kb)\n".write(toFile: path, atomically: false, encoding: .utf8)) == nil {
            log.debug("could not set \(path)")
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP, detaches the mount, which ends the request
/// loop (the kernel then answers its reads with ENODEV). The handler only
/// writes a byte to a pipe; a thread does the rest.
final class SignalUnmounter: Sendable {
    static let pipeWrite = Atomic<Int32>(-1)
    private let readFD: Int32
    private let writeFD: Int32

    init(mountpoint: String) {
        var fds: [Int32] = [-1, -1]
        _ = pipe(&fds)
        readFD = fds[0]
        writeFD = fds[1]
        Self.pipeWrite.store(writeFD, ordering: .sequentiallyConsistent)
        for s in [SIGINT, SIGTERM, SIGHUP] {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = signalToPipe
            sigemptyset(&action.sa_mask)
            action.sa_flags = SA_RESTART
            sigaction(s, &action, nil)
        }
        let fd = readFD
        let t = Thread {
            var b: UInt8 = 0
            while true {
                let n = read(fd, &b, 1)
                if n < 0 && errno == EINTR { continue }
                break
            }
            if b == 1 {
                log.info("signal received: unmounting \(mountpoint)")
                FuseMount.detach(mountpoint)
            }
        }
        t.name = "casfs-signals"
        t.start()
    }

    /// Ends the waiting thread (the mount is going away anyway).
    func cancel() {
        Self.pipeWrite.store(-1, ordering: .sequentiallyConsistent)
        var b: UInt8 = 2
        _ = write(writeFD, &b, 1)
    }
}

private func signalToPipe(_ sig: Int32) {
    let fd = SignalUnmounter.pipeWrite.load(ordering: .sequentiallyConsistent)
    guard fd >= 0 else { return }
    var b: UInt8 = 1
    _ = write(fd, &b, 1)
}
