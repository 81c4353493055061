import CLinux
import Foundation

/// A process watched through a pidfd (Linux 5.3+): the handle names that one
/// process even after its pid is reused, and becomes readable once it has
/// exited (a zombie has exited). Whether the process is a child or not.
public final class ProcessHandle: @unchecked Sendable {
    public let pid: pid_t
    private let fd: Int32

    /// Opens a handle on `pid`; nil if the process does not exist (ESRCH)
    /// or no descriptor could be had (the errno is in `openError`).
    public init?(pid: pid_t) {
        guard pid > 0 else { return nil }
        let fd = casfs_pidfd_open(pid)
        guard fd >= 0 else { return nil }
        // pidfds are close-on-exec from birth.
        self.pid = pid
        self.fd = fd
    }

    deinit { close(fd) }

    /// True once the process has exited (or been reaped).
    public var hasExited: Bool { waitForExit(timeout: 0) }

    /// Waits up to `timeout` seconds (0: just looks; negative: forever);
    /// true if the process has exited.
    public func waitForExit(timeout: Double) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let end = Date().addingTimeInterval(max(0, timeout))
        while true {
            let left = timeout < 0 ? -1 : Int32(max(0, min(Double(Int32.max / 2), end.timeIntervalSinceNow * 1000)).rounded(.up))
            let r = poll(&p, 1, left)
            if r > 0 { return true }
            if r == 0 { return false }
            if errno != EINTR { return false }
            if timeout >= 0 && Date() >= end { return false }
        }
    }

    /// Sends `signal` to exactly this process (never to a process that
    /// reused its pid); false if it has exited.
    @discardableResult
    public func signal(_ signal: Int32) -> Bool {
        casfs_pidfd_send_signal(fd, signal) == 0
    }
}

/// True if process `pid` exists and has not exited (a zombie, not yet
/// reaped by its parent, has exited). Read from /proc/PID/stat, whose state
/// letter follows the parenthesised command name.
public func processIsAlive(_ pid: pid_t) -> Bool {
    guard pid > 0, let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return false }
    let state = stat[stat.index(after: close)...].drop(while: { $0 == " " }).first
    return state != nil && state != "Z" && state != "X"
}
