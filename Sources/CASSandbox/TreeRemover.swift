import Foundation

/// Removes a directory tree as `rm -rf --one-file-system` does, relative to
/// directory descriptors (openat, unlinkat, fdopendir), so that no path
/// grows longer than one name: a tree nested deeper than PATH_MAX goes as
/// any other. Symbolic links are removed, never followed. Directories the
/// tree's owner made unwritable or unreadable are made accessible first. It
/// holds two descriptors at most, whatever the depth: it climbs back with
/// `..`, checking that it arrives where it came from. A directory on another
/// mount (another filesystem, or a bind mount of the same one) is not
/// entered: that is an error. Nothing outside the tree is changed: not the
/// mode of the directory it is in, nor that of what a symlink points to.
public enum TreeRemover {
    /// Removes `path` (a directory tree, or any other file) and everything
    /// under it. Nothing there is not an error.
    public static func remove(_ path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else {
            if errno == ENOENT { return }
            throw failure(path, "lstat", errno)
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else {
            guard unlink(path) == 0 || errno == ENOENT else { throw failure(path, "unlink", errno) }
            return
        }
        let fd = try openDirectory(AT_FDCWD, path, in: nil, shown: path)
        do {
            try removeContents(fd, root: path)
        } catch {
            close(fd)
            throw error
        }
        close(fd)
        // The directory it is in is not the tree's: its mode is left as it is.
        guard rmdir(path) == 0 || errno == ENOENT else { throw failure(path, "rmdir", errno) }
    }

    /// Removes everything inside the directory open at `rootFD` (which
    /// stays open) but the entries of the root named in `keeping`.
    public static func removeContents(_ rootFD: Int32, root: String, keeping: Set<String> = []) throws {
        var rootStat = stat()
        guard fstat(rootFD, &rootStat) == 0 else { throw failure(root, "fstat", errno) }
        // A bind mount of the same filesystem has the same st_dev: the mount ID tells it apart.
        let tree = Tree(device: rootStat.st_dev, mount: mountID(rootFD))
        // One frame per level below the root: the subdirectories still to
        // remove, and the identity of the directory they are in.
        struct Frame {
            var pending: [String]
            var device: UInt
            var inode: UInt
            var nameInParent: String
        }
        let start = fcntl(rootFD, F_DUPFD_CLOEXEC, 0)
        guard start >= 0 else { throw failure(root, "dup", errno) }
        var current = start
        defer { close(current) }
        var stack: [Frame] = []
        var level = Frame(pending: try scan(current, where: root, depth: 0, keeping: keeping), device: UInt(rootStat.st_dev),
                          inode: UInt(rootStat.st_ino), nameInParent: "")
        while true {
            if let name = level.pending.popLast() {
                // Down one level.
                let child: Int32
                do {
                    child = try openDirectory(current, name, in: tree, shown: describe(root, stack.count + 1, name))
                } catch let e as Failure where e.code == ENOTDIR || e.code == ELOOP {
                    // Replaced by a file or a symlink meanwhile: remove that.
                    try unlinkEntry(current, name, directory: false, shown: describe(root, stack.count + 1, name))
                    continue
                }
                var st = stat()
                guard fstat(child, &st) == 0 else {
                    let e = errno
                    close(child)
                    throw failure(describe(root, stack.count + 1, name), "fstat", e)
                }
                guard tree.contains(child, st) else {
                    close(child)
                    throw Failure(description: "\(describe(root, stack.count + 1, name)) is a mount point (another filesystem, or a bind mount): not removed", code: EXDEV)
                }
                let entries: [String]
                do { entries = try scan(child, where: describe(root, stack.count + 1, name), depth: stack.count + 1) } catch {
                    close(child)
                    throw error
                }
                stack.append(level)
                level = Frame(pending: entries, device: UInt(st.st_dev), inode: UInt(st.st_ino), nameInParent: name)
                close(current)
                current = child
                continue
            }
            // This level is done: make sure nothing new arrived, then go up and remove it.
            let late = try scan(current, where: describe(root, stack.count, level.nameInParent), depth: stack.count,
                                keeping: stack.isEmpty ? keeping : [])
            if !late.isEmpty {
                level.pending = late
                continue
            }
            guard let parent = stack.popLast() else { return }
            let up = openat(current, "..", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard up >= 0 else { throw failure(describe(root, stack.count, ".."), "open", errno) }
            var st = stat()
            guard fstat(up, &st) == 0, UInt(st.st_dev) == parent.device, UInt(st.st_ino) == parent.inode else {
                close(up)
                throw Failure(description: "\(root): a directory was moved while it was being removed; stopped", code: EBUSY)
            }
            close(current)
            current = up
            try unlinkEntry(current, level.nameInParent, directory: true, shown: describe(root, stack.count + 1, level.nameInParent))
            level = parent
        }
    }

    /// Why a removal failed; `code` is the errno.
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        public let code: Int32
    }

    /// Unlinks every entry of `dir` that is not a directory; returns the
    /// names of the subdirectories.
    private static func scan(_ dir: Int32, where shown: String, depth: Int, keeping: Set<String> = []) throws -> [String] {
        // Entries can be listed only with read and search permission.
        var st = stat()
        if fstat(dir, &st) == 0, st.st_uid == geteuid(), st.st_mode & 0o700 != 0o700 {
            _ = fchmod(dir, mode_t(st.st_mode & 0o7777) | 0o700)
        }
        let listing = fcntl(dir, F_DUPFD_CLOEXEC, 0)
        guard listing >= 0 else { throw failure(shown, "dup", errno) }
        guard let d = fdopendir(listing) else {
            let e = errno
            close(listing)
            throw failure(shown, "opendir", e)
        }
        defer { closedir(d) }
        rewinddir(d)
        var directories: [String] = []
        var files: [String] = []
        while true {
            errno = 0
            guard let entry = readdir(d) else {
                if errno != 0 { throw failure(shown, "readdir", errno) }
                break
            }
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            let nameBytes = withUnsafeBytes(of: entry.pointee.d_name) { Array($0.prefix(while: { $0 != 0 })) }
            if nameBytes == [0x2e] || nameBytes == [0x2e, 0x2e] || keeping.contains(name) { continue }
            // A name that is not UTF-8 cannot round-trip through String: keep its bytes.
            guard Array(name.utf8) == nameBytes else {
                try unlinkRaw(dir, nameBytes, shown: shown)
                continue
            }
            var isDirectory = entry.pointee.d_type == UInt8(DT_DIR)
            if entry.pointee.d_type == UInt8(DT_UNKNOWN) {
                var est = stat()
                isDirectory = fstatat(dir, name, &est, AT_SYMLINK_NOFOLLOW) == 0 && (est.st_mode & S_IFMT) == S_IFDIR
            }
            if isDirectory { directories.append(name) } else { files.append(name) }
        }
        for f in files { try unlinkEntry(dir, f, directory: false, shown: shown + "/" + f) }
        return directories
    }

    /// unlinkat, making `dir` writable once if that is what stops it.
    private static func unlinkEntry(_ dir: Int32, _ name: String, directory: Bool, shown: String) throws {
        let flags = directory ? AT_REMOVEDIR : 0
        if unlinkat(dir, name, flags) == 0 || errno == ENOENT { return }
        var e = errno
        if e == EACCES || e == EPERM {
            var st = stat()
            if fstat(dir, &st) == 0 {
                _ = fchmod(dir, mode_t(st.st_mode & 0o7777) | 0o700)
                if unlinkat(dir, name, flags) == 0 || errno == ENOENT { return }
                e = errno
            }
        }
        throw failure(shown, directory ? "rmdir" : "unlink", e)
    }

    private static func unlinkRaw(_ dir: Int32, _ name: [UInt8], shown: String) throws {
        let cName = name.map { CChar(bitPattern: $0) } + [0]
        var st = stat()
        let isDirectory = fstatat(dir, cName, &st, AT_SYMLINK_NOFOLLOW) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
        if isDirectory {
            // Rare: give it a UTF-8 name and let the walk take it.
            let temporary = ".casfs-rm-\(UInt64.random(in: 0...UInt64.max))"
            guard renameat(dir, cName, dir, temporary) == 0 else { throw failure(shown, "rename", errno) }
            return
        }
        if unlinkat(dir, cName, 0) == 0 || errno == ENOENT { return }
        throw failure(shown + "/" + String(decoding: name, as: UTF8.self), "unlink", errno)
    }

    /// The mount the tree is on: a directory elsewhere (another filesystem,
    /// a bind mount) is not part of it.
    struct Tree {
        let device: dev_t
        /// Nil when the kernel does not tell (no /proc): then the device alone decides.
        let mount: Int?

        init(device: dev_t, mount: Int?) {
            self.device = device
            self.mount = mount
        }

        /// The tree whose root is open at `fd`.
        init?(root fd: Int32) {
            var st = stat()
            guard fstat(fd, &st) == 0 else { return nil }
            self.init(device: st.st_dev, mount: TreeRemover.mountID(fd))
        }

        func contains(_ fd: Int32, _ st: stat) -> Bool {
            guard st.st_dev == device else { return false }
            guard let mount else { return true }
            return TreeRemover.mountID(fd) == mount
        }
    }

    /// The ID of the mount `fd` is on (the `mnt_id` of /proc/self/fdinfo),
    /// nil if it cannot be read.
    static func mountID(_ fd: Int32) -> Int? {
        let info = open("/proc/self/fdinfo/\(fd)", O_RDONLY | O_CLOEXEC)
        guard info >= 0 else { return nil }
        defer { close(info) }
        var buffer = [UInt8](repeating: 0, count: 1024)
        var used = 0
        while used < buffer.count {
            let n = buffer.withUnsafeMutableBytes { read(info, $0.baseAddress! + used, $0.count - used) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            used += n
        }
        for line in String(decoding: buffer[0..<used], as: UTF8.self).split(separator: "\n")
        where line.hasPrefix("mnt_id:") {
            return Int(line.dropFirst("mnt_id:".count).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    /// `tree` nil: `name` is the tree's root (it is then of no mount to check against).
    private static func openDirectory(_ at: Int32, _ name: String, in tree: Tree?, shown: String) throws -> Int32 {
        let flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
        var fd = openat(at, name, flags)
        if fd < 0 && (errno == EACCES || errno == EPERM) {
            // Owner-unreadable or unsearchable: make it ours again.
            makeAccessible(at, name, in: tree)
            fd = openat(at, name, flags)
        }
        guard fd >= 0 else { throw failure(shown, "open", errno) }
        return fd
    }

    /// Adds owner rwx to the directory `name` in `at`, if that is a
    /// directory (not a symlink put there meanwhile) of the tree's mount.
    /// Through an O_PATH descriptor: what is changed is what was checked.
    static func makeAccessible(_ at: Int32, _ name: String, in tree: Tree?) {
        let path = openat(at, name, oPath | O_NOFOLLOW | O_CLOEXEC)
        guard path >= 0 else { return }
        defer { close(path) }
        var st = stat()
        guard fstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR, tree?.contains(path, st) ?? true else { return }
        // fchmod does not take an O_PATH descriptor; its /proc link names that very directory.
        _ = chmod("/proc/self/fd/\(path)", mode_t(st.st_mode & 0o7777) | 0o700)
    }

    /// O_PATH (Linux's value on x86-64 and arm64), which Swift's Glibc does not export.
    private static let oPath: Int32 = 0o10000000

    /// A path for messages: the root and, below it, the depth and the name
    /// (a full path may be longer than any message should be).
    private static func describe(_ root: String, _ depth: Int, _ name: String) -> String {
        depth <= 0 ? root : depth == 1 ? "\(root)/\(name)" : "\(root)/…(\(depth - 1) levels)…/\(name)"
    }

    private static func failure(_ path: String, _ call: String, _ code: Int32) -> Failure {
        Failure(description: "cannot remove \(path): \(call): \(String(cString: strerror(code)))", code: code)
    }
}
