import Foundation

/// What a sandboxed command sees and may do, turned into bwrap's command line.
///
/// Filesystem: an empty read-only root holding only the system (/usr, /etc
/// and the /bin, /sbin, /lib* entries as the host has them, read-only; in
/// /etc, what others may not read is masked), a private /tmp, /dev and
/// /proc of its own, then (each when given) the casfs mount read-only at
/// /cas, an input root read-only at /input, an output directory writable
/// at /out, and the caller's further mounts in order. /opt is not the
/// system: a toolchain there is bound in by the caller. Privileges: a user
/// namespace with the caller's uid and gid and no capabilities (none
/// effective, permitted, inheritable, ambient or in the bounding set),
/// no_new_privs, no further user namespaces; new mount, PID, IPC, UTS and
/// cgroup namespaces, and a network namespace with only a loopback unless
/// the host network is asked for.
public struct SandboxSpec: Sendable, Equatable {
    /// A casfs mount on the host, shown read-only at `Sandbox.cas`.
    public var mount: String?
    /// A host directory (e.g. `<mount>/tree/<digest>`) shown read-only at `Sandbox.input`.
    public var inputRoot: String?
    /// A host directory shown writable at `Sandbox.output`.
    public var output: String?
    /// Further operations, in order; a bind inside another one must come after it.
    public var mounts: [SandboxMount]
    /// The working directory inside (absolute).
    public var workingDirectory: String
    /// Share the host's network (default: a private loopback only).
    public var network: Bool
    /// The command's environment; nil: this process's.
    public var environment: [String: String]?
    /// Name the fixed paths in the environment (CASFS_INPUT_ROOT,
    /// CASFS_OUTPUT, CASFS_MOUNT), as `casfs run` does.
    public var namesPaths: Bool

    public init(mount: String? = nil, inputRoot: String? = nil, output: String? = nil, mounts: [SandboxMount] = [],
                workingDirectory: String = "/", network: Bool = false, environment: [String: String]? = nil,
                namesPaths: Bool = false) {
        self.mount = mount
        self.inputRoot = inputRoot
        self.output = output
        self.mounts = mounts
        self.workingDirectory = workingDirectory
        self.network = network
        self.environment = environment
        self.namesPaths = namesPaths
    }

    /// Throws unless every path inside is absolute.
    public func validate() throws {
        guard workingDirectory.hasPrefix("/") else {
            throw SandboxError("the working directory \(workingDirectory): give an absolute path inside the sandbox")
        }
        for m in mounts where !m.path.hasPrefix("/") {
            throw SandboxError("\(m.path): a path inside the sandbox must be absolute")
        }
    }

    /// bwrap's arguments up to (not including) `--` and the command.
    public var bwrapArguments: [String] {
        filesystem + Sandbox.privileges(network: network) + environmentArguments
    }

    var filesystem: [String] {
        var a = ["--tmpfs", "/"]
        for dir in Sandbox.systemDirectories where isDirectory(dir) {
            a += ["--ro-bind", dir, dir]
            if dir == Sandbox.configuration { a += HiddenEntries.bwrapArguments(HiddenEntries.find(under: dir)) }
        }
        for path in Sandbox.systemEntries {
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
        if let mount { a += ["--dir", Sandbox.cas, "--ro-bind", mount, Sandbox.cas] }
        if let inputRoot { a += ["--dir", Sandbox.input, "--ro-bind", inputRoot, Sandbox.input] }
        if let output { a += ["--dir", Sandbox.output, "--bind", output, Sandbox.output] }
        for m in mounts { a += m.bwrapArguments }
        a += ["--remount-ro", "/"]
        return a
    }

    /// The fixed paths named (or their names removed), then the working directory.
    var environmentArguments: [String] {
        var a: [String] = []
        if namesPaths {
            for (name, path, shown) in [("CASFS_INPUT_ROOT", Sandbox.input, inputRoot != nil),
                                        ("CASFS_OUTPUT", Sandbox.output, output != nil),
                                        ("CASFS_MOUNT", Sandbox.cas, mount != nil)] {
                a += shown ? ["--setenv", name, path] : ["--unsetenv", name]
            }
        }
        a += ["--setenv", "PWD", workingDirectory, "--chdir", workingDirectory]
        return a
    }

    private func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }
}

extension Sandbox {
    public static let input = "/input"
    public static let output = "/out"
    public static let cas = "/cas"
    /// The paths `casfs run` reserves for its fixed binds.
    public static var reserved: [String] { [input, output, cas] }

    /// Host directories shown read-only at their own path.
    public static let systemDirectories = ["/usr", "/etc"]
    /// Top-level entries that are symlinks into /usr on a merged-/usr
    /// system and directories elsewhere: recreated as symlinks, or shown
    /// read-only.
    public static let systemEntries = ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    /// The host directory whose unreadable entries are masked.
    public static let configuration = "/etc"

    /// No capabilities and no way back to them; namespaces of its own. The
    /// sandbox dies with bwrap (and everything in its PID namespace with
    /// the namespace's first process).
    static func privileges(network: Bool) -> [String] {
        var a = ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        a += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup"]
        if !network { a += ["--unshare-net"] }
        a += ["--die-with-parent", "--new-session"]
        return a
    }
}
