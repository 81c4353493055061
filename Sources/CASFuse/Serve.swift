import CASCore
import Foundation
import FuseKernel

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
    public var requestThreads: Int { options.threads > 0 ? options.threads : max(4, 2 * ProcessInfo.processInfo.activeProcessorCount) }

    /// Page-cache readahead of a FUSE mount defaults to 128 KiB; raise it to the
    /// request size so sequential reads arrive in large requests. Best effort.
    public func raiseReadAhead(resolvedMountpoint real: String) {
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
