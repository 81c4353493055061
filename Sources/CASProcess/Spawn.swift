import CLinux
import Foundation

/// Starting child processes: posix_spawn with a clean signal state (an
/// empty mask, default dispositions for the signals a daemon handles), no
/// descriptor of this process but those asked for, and optionally a
/// session of their own. Foundation's Process is not used: it has hung
/// waiting on children that daemonize.
public enum Spawn {
    /// Signals whose disposition a child gets back at default: a parent
    /// that ignores or handles them must not pass that on.
    public static let signalsToDefault: [Int32] = [SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM]

    /// `name` in $PATH (then in `extraDirectories`), if it is an executable file.
    public static func findExecutable(_ name: String, extraDirectories: [String] = []) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
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

    /// What a child's standard descriptor is.
    public enum Stream: Sendable, Equatable {
        /// This process's own descriptor of the same number.
        case inherit
        /// /dev/null.
        case null
        /// A descriptor of this process (placed at the child's number; the
        /// caller keeps and closes its own).
        case descriptor(Int32)
    }

    /// Starts `executable` with `argv` (argv[0] included).
    /// - Parameters:
    ///   - environment: nil: this process's.
    ///   - stdin/stdout/stderr: the child's standard descriptors.
    ///   - descriptors: further descriptors placed in the child (child
    ///     number → descriptor here), each above 2; every other descriptor
    ///     of this process is closed in the child, close-on-exec or not.
    ///   - newSession: the child leads a session (and process group) of its own.
    ///   - processGroup: the child leads a process group of its own (ignored with `newSession`).
    /// - Returns: the pid, or posix_spawn's error.
    public static func start(_ executable: String, _ argv: [String], environment: [String: String]? = nil,
                             stdin: Stream = .null, stdout: Stream = .null, stderr: Stream = .null,
                             descriptors: [Int32: Int32] = [:], newSession: Bool = false,
                             processGroup: Bool = false) -> Result<pid_t, SpawnError> {
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attr, &none)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in signalsToDefault { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        var flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF
        if newSession {
            flags |= Int32(casfs_posix_spawn_setsid())
        } else if processGroup {
            flags |= POSIX_SPAWN_SETPGROUP
            posix_spawnattr_setpgroup(&attr, 0)
        }
        posix_spawnattr_setflags(&attr, Int16(flags))

        var standard: [Int32: Int32] = [:]
        var nulls: Set<Int32> = []
        for (fd, stream) in [(Int32(0), stdin), (1, stdout), (2, stderr)] {
            switch stream {
            case .inherit: break
            case .null: nulls.insert(fd)
            case .descriptor(let source): standard[fd] = source
            }
        }
        let placement = Self.placement(standard: standard, nulls: nulls, descriptors: descriptors)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (source, staged) in placement.staging {
            posix_spawn_file_actions_adddup2(&actions, source, staged)
        }
        for (fd, stream) in [(Int32(0), stdin), (1, stdout), (2, stderr)] {
            switch stream {
            case .inherit:
                break
            case .null:
                posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0)
            case .descriptor:
                break
            }
        }
        // dup2 clears close-on-exec on the copy (onto the same number too,
        // glibc 2.29+); the staged copies go with the close below.
        for (target, staged) in placement.moves {
            posix_spawn_file_actions_adddup2(&actions, staged, target)
        }
        casfs_spawn_addclosefrom(&actions, placement.firstClosed)

        // With the soft limit of open descriptors raised for this process,
        // the child starts at the limit this process was given: through
        // util-linux's prlimit, which sets it and executes the program in
        // place (same pid; argv[0] becomes the program's path). Without
        // prlimit the child inherits the raised limit.
        let program = executable
        var executable = executable
        var argv = argv
        if let restore = Descriptors.limitForChildren() {
            guard access(executable, X_OK) == 0 else {
                return .failure(SpawnError(executable: executable, code: errno))
            }
            if let prlimit = Self.prlimit {
                argv = [prlimit, "--nofile=\(restore):", "--", executable.contains("/") ? executable : "./" + executable]
                    + argv.dropFirst()
                executable = prlimit
            }
        }

        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { env in env.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil] }
        defer {
            cArgs.forEach { free($0) }
            cEnv?.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = cEnv.map { posix_spawn(&pid, executable, &actions, &attr, cArgs, $0) }
            ?? posix_spawn(&pid, executable, &actions, &attr, cArgs, environ)
        return rc == 0 ? .success(pid) : .failure(SpawnError(executable: program, code: rc))
    }

    /// util-linux's prlimit, which starts children at the original soft limit of open descriptors.
    static let prlimit: String? = findExecutable("prlimit", extraDirectories: ["/usr/bin", "/bin"])

    /// Where each descriptor a child is given goes, in two steps so that no
    /// source is overwritten before it is copied (a map such as [3: a, 4: 3]):
    /// every source is first copied above all sources and targets, then from
    /// there onto its target; everything from `firstClosed` up is closed.
    struct Placement: Equatable {
        /// Source here → its staged copy in the child.
        var staging: [(Int32, Int32)]
        /// Target → staged copy.
        var moves: [(Int32, Int32)]
        var firstClosed: Int32

        static func == (a: Placement, b: Placement) -> Bool {
            a.staging.elementsEqual(b.staging, by: ==) && a.moves.elementsEqual(b.moves, by: ==) && a.firstClosed == b.firstClosed
        }
    }

    /// `standard`: the standard descriptors given a descriptor of this
    /// process; `nulls`: those opened on /dev/null (before the moves).
    static func placement(standard: [Int32: Int32], nulls: Set<Int32> = [], descriptors: [Int32: Int32]) -> Placement {
        var targets = standard
        for (target, source) in descriptors { targets[target] = source }
        let sorted = targets.sorted { $0.key < $1.key }
        let firstClosed = max(2, descriptors.keys.max() ?? 2) + 1
        // No source is replaced by anything else: each goes straight to its place.
        let replaced = { (fd: Int32) in nulls.contains(fd) || (targets[fd] != nil && targets[fd] != fd) }
        if !sorted.contains(where: { replaced($0.value) }) {
            return Placement(staging: [], moves: sorted.map { ($0.key, $0.value) }, firstClosed: firstClosed)
        }
        let highest = ([2] + sorted.map(\.key) + sorted.map(\.value)).max() ?? 2
        var staged: [Int32: Int32] = [:]
        var staging: [(Int32, Int32)] = []
        var next = highest + 1
        for (_, source) in sorted where staged[source] == nil {
            staged[source] = next
            staging.append((source, next))
            next += 1
        }
        let moves = sorted.map { ($0.key, staged[$0.value]!) }
        return Placement(staging: staging, moves: moves, firstClosed: firstClosed)
    }

    /// Starts `executable` with stdin, stdout and (unless `keepStderr`)
    /// stderr on /dev/null. `environment` nil: this process's.
    public static func quiet(_ executable: String, _ argv: [String], environment: [String: String]? = nil,
                             keepStderr: Bool = false, descriptors: [Int32: Int32] = [:],
                             newSession: Bool = false) -> Result<pid_t, SpawnError> {
        start(executable, argv, environment: environment, stdout: .null, stderr: keepStderr ? .inherit : .null,
              descriptors: descriptors, newSession: newSession)
    }

    /// Waits for `pid`: its exit status, or 128+N for a death by signal N; nil
    /// if it cannot be waited for.
    public static func wait(_ pid: pid_t) -> Int32? {
        waitForTermination(pid)?.status
    }

    /// Waits for `pid`; nil if it cannot be waited for (not a child).
    public static func waitForTermination(_ pid: pid_t) -> Termination? {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return nil }
        }
        return Termination(waitStatus: status)
    }

    /// Waits up to `seconds` for child `pid`; nil if it still runs. A pid
    /// that is not (or no longer) a child counts as ended, with status 0.
    public static func wait(_ pid: pid_t, seconds: Double) -> Termination? {
        let end = Date().addingTimeInterval(seconds)
        var status: Int32 = 0
        repeat {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid { return Termination(waitStatus: status) }
            if r < 0 && errno == ECHILD { return .exited(0) }
            usleep(20_000)
        } while Date() < end
        return nil
    }

    /// Runs `argv` (argv[0] looked up in PATH) quietly to its end: its exit
    /// status, 127 when it cannot be started.
    public static func runQuietly(_ argv: [String]) -> Int32 {
        guard let exe = findExecutable(argv[0]), case .success(let pid) = quiet(exe, argv) else { return 127 }
        return wait(pid) ?? 127
    }
}

/// How a child ended.
public enum Termination: Equatable, Sendable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    public init(waitStatus status: Int32) {
        let sig = status & 0x7f
        self = sig == 0 ? .exited((status >> 8) & 0xff) : .signaled(sig)
    }

    /// The shell's convention: the exit status, or 128+N for signal N.
    public var status: Int32 {
        switch self {
        case .exited(let code): code
        case .signaled(let sig): 128 + sig
        }
    }

    public var description: String {
        switch self {
        case .exited(let code): "exit status \(code)"
        case .signaled(let sig): "killed by signal \(sig)"
        }
    }
}

public struct SpawnError: Error, CustomStringConvertible {
    public let executable: String
    public let code: Int32
    public init(executable: String, code: Int32) {
        self.executable = executable
        self.code = code
    }
    public var description: String { "cannot start \(executable): \(String(cString: strerror(code)))" }
}
