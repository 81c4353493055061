import Foundation

/// Small process helpers over posix_spawn/waitpid (Foundation's Process has
/// hung waiting on children that daemonize).
public enum Spawn {
    /// `name` in $PATH (then in `extraDirectories`), if it is an executable file.
    public static func findExecutable(_ name: String, extraDirectories: [String] = []) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":").map(String.init) + extraDirectories where !dir.isEmpty {
            let candidate = "\(dir)/\(name)"
            var st = stat()
            if stat(candidate, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, access(candidate, X_OK) == 0 {
                return candidate
            }
        }
        return nil
    }

    /// Starts `executable` with `argv` (argv[0] included) and stdin from
    /// /dev/null; stdout, and stderr unless `keepStderr`, go to /dev/null.
    /// `environment` nil: this process's. Returns the pid or posix_spawn's error.
    public static func quiet(_ executable: String, _ argv: [String], environment: [String: String]? = nil,
                             keepStderr: Bool = false) -> Result<pid_t, SpawnError> {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        if !keepStderr { posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0) }
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { env in env.map { strdup("\($0.key)=\($0.value)") } + [nil] }
        defer {
            cArgs.forEach { free($0) }
            cEnv?.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = cEnv.map { posix_spawn(&pid, executable, &actions, nil, cArgs, $0) }
            ?? posix_spawn(&pid, executable, &actions, nil, cArgs, environ)
        return rc == 0 ? .success(pid) : .failure(SpawnError(executable: executable, code: rc))
    }

    /// Waits for `pid`: its exit status, or 128+N for a death by signal N; nil
    /// if it cannot be waited for.
    public static func wait(_ pid: pid_t) -> Int32? {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return nil }
        }
        let sig = status & 0x7f
        return sig == 0 ? (status >> 8) & 0xff : 128 + sig
    }
}

public struct SpawnError: Error, CustomStringConvertible {
    public let executable: String
    public let code: Int32
    public var description: String { "cannot start \(executable): \(String(cString: strerror(code)))" }
}
