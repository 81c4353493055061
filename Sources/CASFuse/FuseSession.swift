import CASCore
import CFuse
import Foundation

public enum FuseError: Error, CustomStringConvertible {
    case sessionCreate
    case signalHandlers
    case mount(String)
    case loop(Int32)

    public var description: String {
        switch self {
        case .sessionCreate: return "could not create the FUSE session (bad mount options?)"
        case .signalHandlers: return "could not install signal handlers"
        case .mount(let m): return "could not mount on \(m) (is /dev/fuse there, fusermount3 installed, the directory empty and not already mounted?)"
        case .loop(let rc): return "FUSE loop ended with error \(rc)"
        }
    }
}

extension CASFilesystem {
    /// The `-o` string given to libfuse (kernel mount options).
    public func kernelMountOptions() -> String {
        var o = ["fsname=\(options.fsName)", "subtype=casfs", "default_permissions",
                 "max_read=\(options.maxRead)", options.writable ? "rw" : "ro"]
        if options.allowOther { o.append("allow_other") }
        return o.joined(separator: ",")
    }

    /// Mounts on `mountpoint` and serves requests until unmounted
    /// (`fusermount3 -u`) or SIGINT/SIGTERM. `ready` runs once the kernel has
    /// initialised the connection. Blocks the calling thread.
    public func serve(mountpoint: String, ready: @escaping @Sendable () -> Void) throws {
        onReady.withLock { $0 = ready }
        var argStrings = ["casfs", "-o", kernelMountOptions()]
        if ProcessInfo.processInfo.environment["CASFS_FUSE_DEBUG"] != nil { argStrings.append("-d") }
        let argv = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: argStrings.count + 1)
        for (i, s) in argStrings.enumerated() { argv[i] = strdup(s) }
        argv[argStrings.count] = nil
        var args = fuse_args(argc: Int32(argStrings.count), argv: argv, allocated: 0)
        defer {
            fuse_opt_free_args(&args)
            for i in 0..<argStrings.count { free(argv[i]) }
            argv.deallocate()
        }

        var ops = makeOperations()
        let me = Unmanaged.passRetained(self)
        defer { me.release() }
        guard let se = casfs_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, me.toOpaque()) else {
            throw FuseError.sessionCreate
        }
        defer { fuse_session_destroy(se) }

        // A shell starting us in the background leaves SIGINT ignored, and
        // libfuse only replaces default dispositions.
        signal(SIGINT, SIG_DFL)
        signal(SIGTERM, SIG_DFL)
        signal(SIGHUP, SIG_DFL)
        guard fuse_set_signal_handlers(se) == 0 else { throw FuseError.signalHandlers }
        defer { fuse_remove_signal_handlers(se) }

        // Resolve the path before mounting: afterwards a stat of it would wait
        // for this very daemon, whose loop has not started yet.
        let resolved = URL(fileURLWithPath: mountpoint).resolvingSymlinksInPath().path
        guard fuse_session_mount(se, resolved) == 0 else { throw FuseError.mount(mountpoint) }
        defer { fuse_session_unmount(se) }
        raiseReadAhead(resolvedMountpoint: resolved)

        log.info("serving \(mountpoint) (\(kernelMountOptions()))")
        let rc = casfs_session_loop_mt(se, UInt32(max(0, options.threads)))
        log.info("unmounting \(mountpoint)")
        if rc < 0 { throw FuseError.loop(rc) }
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
