import CLinux
import Foundation
import Synchronization

/// What the system's mount table says about a path.
public enum MountTable {
    /// True if `path` is the mount point of a mounted filesystem (read from
    /// /proc/self/mountinfo, so a dead FUSE mount does not block the check).
    public static func isMountPoint(_ path: String) -> Bool {
        guard let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return false }
        let url = URL(fileURLWithPath: path).standardizedFileURL
        let real = url.deletingLastPathComponent().resolvingSymlinksInPath().appendingPathComponent(url.lastPathComponent).path
        for line in info.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 4 else { continue }
            let mp = fields[4].replacingOccurrences(of: "\\040", with: " ")
            if mp == real { return true }
        }
        return false
    }

    /// True if `path` is a FUSE mount whose daemon is gone (ENOTCONN). statfs
    /// always reaches the daemon (a stat or a listing may come from the
    /// kernel's cache); it runs on a thread of its own, so a daemon that is
    /// alive but slow to answer is taken for alive after a few seconds.
    public static func isDeadFuseMount(_ path: String) -> Bool {
        let result = Mutex<Int32?>(nil)
        let answered = DispatchSemaphore(value: 0)
        let t = Thread {
            var st = statvfs()
            let rc = statvfs(path, &st) == 0 ? 0 : errno
            result.withLock { $0 = rc }
            answered.signal()
        }
        t.start()
        guard answered.wait(timeout: .now() + 5) == .success else { return false }
        return result.withLock { $0 } == ENOTCONN
    }

    /// True if `path` is served by a live casfs mount (its root has the stats attribute).
    public static func isCasfsMount(_ path: String) -> Bool {
        getxattr(path, "user.casfs.stats", nil, 0) > 0
    }
}
