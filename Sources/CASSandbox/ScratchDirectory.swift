import Foundation

/// A private temporary directory for one run (`<base>/<prefix><pid>-XXXXXX`)
/// that a process holds for its lifetime by an flock on `.lock` inside it.
/// A directory whose lock nobody holds belongs to a run that was killed:
/// `removeStale` takes it away, mounts inside it first.
public final class ScratchDirectory: @unchecked Sendable {
    public let path: String
    private var lockFD: Int32

    /// The lock file's name inside the directory.
    public static let lockName = ".lock"

    /// Creates the directory (mode 0700) in `base` and takes its lock.
    public init(in base: String, prefix: String) throws {
        var template = Array("\(base)/\(prefix)\(getpid())-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else {
            throw SandboxError("cannot create a temporary directory in \(base): \(String(cString: strerror(errno)))")
        }
        path = String(cString: p)
        let fd = open(path + "/" + Self.lockName, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0, flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let e = errno
            if fd >= 0 { close(fd) }
            _ = try? TreeRemover.remove(path)
            throw SandboxError("cannot lock \(path): \(String(cString: strerror(e)))")
        }
        lockFD = fd
    }

    /// The lock's descriptor (close-on-exec): pass it as `keepOpen` to
    /// `Sandbox.start` so that the directory stays taken while the sandbox
    /// runs; -1 once removed.
    public var lockDescriptor: Int32 { lockFD }

    deinit {
        if lockFD >= 0 { close(lockFD) }
    }

    /// Removes the directory and all it holds (at any depth), then lets go
    /// of the lock. Throws what could not be removed (the directory then
    /// stays, with its lock file, for `removeStale` of a later run).
    public func remove() throws {
        defer {
            if lockFD >= 0 { close(lockFD) }
            lockFD = -1
        }
        try Self.removeKeepingLockLast(path)
    }

    /// Everything but the lock file, then the lock file and the directory:
    /// a removal that fails leaves a directory `removeStale` still knows.
    static func removeKeepingLockLast(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return }
            throw SandboxError("cannot remove \(path): open: \(String(cString: strerror(errno)))")
        }
        do { try TreeRemover.removeContents(fd, root: path, keeping: [lockName]) } catch {
            close(fd)
            throw error
        }
        close(fd)
        try TreeRemover.remove(path)
    }

    /// What `removeStale` did with one directory.
    public struct StaleOutcome: Sendable, Equatable {
        public var path: String
        /// nil: removed; else why it stays.
        public var error: String?

        public init(path: String, error: String?) {
            self.path = path
            self.error = error
        }
    }

    /// Removes the directories `<base>/<prefix>*` whose lock is free (their
    /// run was killed), unmounting first (deepest first) every mount found
    /// under one with `unmount` (which returns false if the mount stays);
    /// a directory with a mount that stays is left alone. Directories that
    /// a live run holds, and those without a lock file, are not touched.
    public static func removeStale(in base: String, prefix: String,
                                   unmount: (String) -> Bool) -> [StaleOutcome] {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: base) else { return [] }
        var outcomes: [StaleOutcome] = []
        for name in names.sorted() where name.hasPrefix(prefix) {
            let dir = base + "/" + name
            var st = stat()
            guard lstat(dir, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR, st.st_uid == geteuid() else { continue }
            let fd = open(dir + "/" + lockName, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { continue }  // a live run holds it
            var mounted = mounts(under: dir)
            for m in mounted.sorted(by: { $0.count > $1.count }) where unmount(m) {
                mounted.removeAll { $0 == m }
            }
            guard mounted.isEmpty else {
                outcomes.append(StaleOutcome(path: dir, error: "still mounted: \(mounted.joined(separator: ", "))"))
                continue
            }
            do {
                try removeKeepingLockLast(dir)
                outcomes.append(StaleOutcome(path: dir, error: nil))
            } catch {
                outcomes.append(StaleOutcome(path: dir, error: "\(error)"))
            }
        }
        return outcomes
    }

    /// Mount points at or under `dir`, from /proc/self/mountinfo.
    public static func mounts(under dir: String) -> [String] {
        guard let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return [] }
        let real = URL(fileURLWithPath: dir).resolvingSymlinksInPath().path
        var found: [String] = []
        for line in info.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count > 4 else { continue }
            let mp = unescape(String(f[4]))
            if mp == real || mp.hasPrefix(real + "/") || mp == dir || mp.hasPrefix(dir + "/") { found.append(mp) }
        }
        return Array(Set(found))
    }

    /// mountinfo escapes space, tab, newline and backslash as \ooo.
    private static func unescape(_ s: String) -> String {
        guard s.contains("\\") else { return s }
        var out: [UInt8] = []
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "\\"), i + 3 < b.count,
               let v = UInt8(String(decoding: b[(i + 1)..<min(i + 4, b.count)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
