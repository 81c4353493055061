import CLinux
import CASProcess
import Foundation

/// Background start of `casfs mount`: the command re-executes itself with
/// `--foreground` in a new session and waits on a pipe until the child reports
/// that the mount is served ("OK") or why it failed ("ERR ..."). Re-exec
/// rather than fork: the child starts threads (libfuse, Redis, writers).
public enum BackgroundStart {
    public static let readyEnv = "CASFS_READY_FD"

    public struct Failed: Error, CustomStringConvertible {
        public let description: String
    }

    /// Spawns the foreground child and waits for readiness. Returns its pid.
    public static func spawnAndWait(arguments: [String]) throws -> pid_t {
        var fds: [Int32] = [0, 0]
        guard casfs_pipe_cloexec(&fds) == 0 else { throw Failed(description: "pipe: \(String(cString: strerror(errno)))") }
        let (rfd, wfd) = (fds[0], fds[1])

        let exe = "/proc/self/exe"
        let argv = [CommandLine.arguments.first ?? "casfs"] + arguments
        var env = ProcessInfo.processInfo.environment
        // The child gets the write end (and nothing else of ours) as descriptor 3.
        let childFD: Int32 = 3
        env[readyEnv] = String(childFD)
        let spawned = Spawn.quiet(exe, argv, environment: env, descriptors: [childFD: wfd])
        close(wfd)
        let pid: pid_t
        switch spawned {
        case .success(let p):
            pid = p
        case .failure(let e):
            close(rfd)
            throw Failed(description: "could not start the mount daemon: \(String(cString: strerror(e.code)))")
        }

        var message = Data()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(rfd, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            message.append(contentsOf: buf[0..<n])
        }
        close(rfd)
        let text = String(decoding: message, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if text == "OK" { return pid }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        if text.hasPrefix("ERR ") { throw Failed(description: String(text.dropFirst(4))) }
        throw Failed(description: "the mount daemon exited before the mount was ready (status \(status))")
    }

    /// In the child: the readiness pipe, if started by `spawnAndWait`.
    public static func readyFD() -> Int32? {
        guard let s = ProcessInfo.processInfo.environment[readyEnv], let fd = Int32(s), fd > 2 else { return nil }
        return fd
    }

    /// Closes every descriptor above stderr except `keep`. A daemon must not
    /// hold its starter's descriptors: a parent waiting for EOF on a pipe
    /// or socket it gave to the starter would wait forever.
    public static func closeInheritedDescriptors(keeping keep: Int32) {
        let fds = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int32($0) }
        for fd in fds where fd > 2 && fd != keep { close(fd) }
    }

    public static func report(_ fd: Int32, _ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }
}
