import Foundation

/// bwrap as casfs run starts it: default signal dispositions, an empty
/// signal mask, and no descriptor of this process but stdin, stdout and
/// stderr (each inherited unless `redirect` replaces it) and the ones that
/// `redirect` places (child descriptor -> descriptor here). A descriptor
/// the caller of casfs run left open never reaches the command.
enum SandboxProcess {
    static let signalsToDefault: [Int32] = SignalForwarding.signals + [SIGPIPE, SIGQUIT]

    static func start(_ exe: String, _ argv: [String], redirect: [Int32: Int32] = [:]) throws -> pid_t {
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
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (target, source) in redirect.sorted(by: { $0.key < $1.key }) {
            posix_spawn_file_actions_adddup2(&actions, source, target)
        }
        let firstClosed = max(2, redirect.keys.max() ?? 2) + 1
        for fd in openDescriptors() where fd >= firstClosed {
            posix_spawn_file_actions_addclose(&actions, fd)
        }

        let cArgs = argv.map { strdup($0) } + [nil]
        defer { cArgs.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, &attr, cArgs, environ)
        guard rc == 0 else { throw CLIError("cannot start \(exe): \(String(cString: strerror(rc)))") }
        return pid
    }

    /// The descriptors open in this process (a close action for one that
    /// is closed by the time of the spawn is ignored).
    private static func openDescriptors() -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int32($0) }
    }

    /// How a child ended.
    enum Termination: Equatable {
        case exited(Int32)
        case signaled(Int32)

        /// The shell's convention: the exit status, or 128+N for signal N.
        var status: Int32 {
            switch self {
            case .exited(let code): code
            case .signaled(let sig): 128 + sig
            }
        }
    }

    /// Waits for `pid`; nil if it cannot be waited for.
    static func wait(_ pid: pid_t) -> Termination? {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return nil }
        }
        let sig = status & 0x7f
        return sig == 0 ? .exited((status >> 8) & 0xff) : .signaled(sig)
    }
}

/// A pipe that this process reads and a child writes. Both ends are
/// close-on-exec and above the standard descriptors, so that the write end
/// can be placed at any descriptor of the child.
final class ChildOutputPipe {
    private(set) var readEnd: Int32
    private(set) var writeEnd: Int32

    init() throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            throw CLIError("cannot create a pipe: \(String(cString: strerror(errno)))")
        }
        readEnd = Self.moveAbove(fds[0], 9)
        writeEnd = Self.moveAbove(fds[1], 9)
    }

    deinit {
        if readEnd >= 0 { close(readEnd) }
        closeWriteEnd()
    }

    /// Once the child has it: from then on, end of file means the child is done.
    func closeWriteEnd() {
        if writeEnd >= 0 { close(writeEnd) }
        writeEnd = -1
    }

    /// Everything written until end of file, or until nothing more is there
    /// if `untilEndOfFile` is false; then the read end is closed.
    func readAll(untilEndOfFile: Bool = true) -> Data {
        var data = Data()
        if !untilEndOfFile {
            _ = fcntl(readEnd, F_SETFL, fcntl(readEnd, F_GETFL) | O_NONBLOCK)
        }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(readEnd, &buffer, buffer.count)
            if n > 0 {
                data.append(contentsOf: buffer[0..<n])
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                break
            }
        }
        close(readEnd)
        readEnd = -1
        return data
    }

    /// `fd` duplicated to the lowest free descriptor above `floor`, close-on-exec, and `fd` closed.
    private static func moveAbove(_ fd: Int32, _ floor: Int32) -> Int32 {
        let moved = fcntl(fd, F_DUPFD_CLOEXEC, floor + 1)
        guard moved >= 0 else {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            return fd
        }
        close(fd)
        return moved
    }
}
