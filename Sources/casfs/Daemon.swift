import Foundation

/// Background start of `casfs mount`: the command re-executes itself with
/// `--foreground` in a new session and waits on a pipe until the child reports
/// that the mount is served ("OK") or why it failed ("ERR ..."). Re-exec
/// rather than fork: the child starts threads (libfuse, Redis, writers).
enum Daemon {
    static let readyEnv = "CASFS_READY_FD"

    struct Failed: Error, CustomStringConvertible {
        let description: String
    }

    /// Spawns the foreground child and waits for readiness. Returns its pid.
    static func spawnAndWait(arguments: [String]) throws -> pid_t {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw Failed(description: "pipe: \(String(cString: strerror(errno)))") }
        let (rfd, wfd) = (fds[0], fds[1])
        _ = fcntl(rfd, F_SETFD, FD_CLOEXEC)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)

        let exe = "/proc/self/exe"
        let argv = [CommandLine.arguments.first ?? "casfs"] + arguments
        var env = ProcessInfo.processInfo.environment
        env[readyEnv] = String(wfd)
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            cArgs.forEach { free($0) }
            cEnv.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, nil, cArgs, cEnv)
        close(wfd)
        guard rc == 0 else {
            close(rfd)
            throw Failed(description: "could not start the mount daemon: \(String(cString: strerror(rc)))")
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
    static func readyFD() -> Int32? {
        guard let s = ProcessInfo.processInfo.environment[readyEnv], let fd = Int32(s), fd > 2 else { return nil }
        return fd
    }

    /// Closes every descriptor above stderr except `keep`. A daemon must not
    /// hold its starter's descriptors: a parent waiting for EOF on a pipe
    /// or socket it gave to the starter would wait forever.
    static func closeInheritedDescriptors(keeping keep: Int32) {
        let fds = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int32($0) }
        for fd in fds where fd > 2 && fd != keep { close(fd) }
    }

    static func report(_ fd: Int32, _ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }
}
