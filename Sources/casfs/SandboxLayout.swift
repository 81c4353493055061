import Foundation

/// What the command of `casfs run` sees and may do: the bwrap command line.
///
/// Filesystem: an empty read-only root holding only the system (/usr, /etc
/// and the /bin, /sbin, /lib* entries as the host has them, read-only; in
/// /etc, what others may not read is masked), /cas, /input, /out, a private
/// /tmp, /dev and /proc of its own, and the caller's binds. /opt is not the
/// system: a toolchain there is bound in by the caller. Privileges: a user
/// namespace with the caller's uid and gid and no capabilities (none
/// effective, permitted, inheritable, ambient or in the bounding set),
/// no_new_privs, no further user namespaces; new mount, PID, IPC, UTS and
/// cgroup namespaces, and a network namespace with only a loopback unless
/// the host network is asked for.
enum Sandbox {
    static let input = "/input"
    static let output = "/out"
    static let cas = "/cas"
    static var reserved: [String] { [input, output, cas] }

    /// Host directories shown read-only at their own path.
    static let systemDirectories = ["/usr", "/etc"]
    /// Top-level entries that are symlinks into /usr on a merged-/usr
    /// system and directories elsewhere: recreated as symlinks, or shown
    /// read-only.
    static let systemEntries = ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    /// The host directory whose unreadable entries are masked.
    static let configuration = "/etc"

    /// One run's sandbox; paths on the host except `chdir`.
    struct Layout {
        var mount: String
        var inputRoot: String?
        var output: String
        var binds: [SandboxBind]
        var chdir: String
        var network: Bool
    }

    /// bwrap's arguments up to (not including) `--` and the command.
    static func bwrapArguments(_ layout: Layout) -> [String] {
        filesystem(layout) + privileges(network: layout.network) + environment(layout)
    }

    static func filesystem(_ layout: Layout) -> [String] {
        var a = ["--tmpfs", "/"]
        for dir in systemDirectories where isDirectory(dir) {
            a += ["--ro-bind", dir, dir]
            if dir == configuration { a += HiddenEntries.bwrapArguments(HiddenEntries.find(under: dir)) }
        }
        for path in systemEntries {
            var st = stat()
            guard lstat(path, &st) == 0 else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFLNK:
                if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: path) {
                    a += ["--symlink", target, path]
                }
            case S_IFDIR:
                a += ["--ro-bind", path, path]
            default:
                continue
            }
        }
        a += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        a += ["--dir", cas, "--ro-bind", layout.mount, cas]
        if let inputRoot = layout.inputRoot { a += ["--dir", input, "--ro-bind", inputRoot, input] }
        a += ["--dir", output, "--bind", layout.output, output]
        for b in layout.binds { a += b.bwrapArguments }
        a += ["--remount-ro", "/"]
        return a
    }

    /// No capabilities and no way back to them; namespaces of its own.
    static func privileges(network: Bool) -> [String] {
        var a = ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        a += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup"]
        if !network { a += ["--unshare-net"] }
        a += ["--die-with-parent", "--new-session"]
        return a
    }

    /// The caller's environment, with the sandbox's paths named.
    static func environment(_ layout: Layout) -> [String] {
        var a: [String] = []
        if layout.inputRoot != nil {
            a += ["--setenv", "CASFS_INPUT_ROOT", input]
        } else {
            a += ["--unsetenv", "CASFS_INPUT_ROOT"]
        }
        a += ["--setenv", "CASFS_OUTPUT", output, "--setenv", "CASFS_MOUNT", cas]
        a += ["--setenv", "PWD", layout.chdir, "--chdir", layout.chdir]
        return a
    }

    private static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }
}
