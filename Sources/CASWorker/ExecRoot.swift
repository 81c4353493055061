import CASSandbox
import Foundation

/// An action's exec root: the lazy input root `<mount>/tree/<digest>` (read
/// only, fetched as it is read) under a writable overlayfs layer whose upper
/// and work directories are in the action's scratch directory on local disk.
/// Writes land in the upper layer; nothing is written into the CAS. Needs
/// root (the worker mounts it; the action, without capabilities, only uses it).
///
/// The worker's mount shows tree directories as 0755 (`tree-directory-mode`),
/// so an action without capabilities may create files in any of them through
/// the overlay. A directory whose own `unix_mode` lacks u+w keeps it; before
/// the run the worker makes the working directory and every parent of an
/// output writable (u+w) in the merged view, creating what is missing, which
/// copies up only those directories' metadata, never a file.
final class ExecRoot {
    let scratch: String
    let root: String
    private var mounted = false

    /// A plain directory in `scratch` (created) for an input root staged by
    /// downloading it (`--input-staging download`).
    init(plainIn scratch: String) throws(WorkerFailure) {
        self.scratch = scratch
        root = scratch + "/root"
        for dir in [scratch, root] {
            guard mkdir(dir, 0o755) == 0 else {
                throw WorkerFailure(.internalError, "cannot create the scratch directory \(dir): \(errnoText())")
            }
        }
    }

    /// Mounts the overlay for `lower` (an input root directory of the
    /// worker's casfs mount) in `scratch` (created; must not exist).
    init(lower: String, scratch: String) throws(WorkerFailure) {
        self.scratch = scratch
        root = scratch + "/root"
        for c in [lower, scratch] where c.contains(",") || c.contains(":") || c.contains("\\") {
            throw WorkerFailure(.internalError, "cannot mount an overlay on '\(c)': the path holds ',', ':' or '\\'")
        }
        for dir in [scratch, scratch + "/upper", scratch + "/work", root] {
            guard mkdir(dir, 0o755) == 0 else {
                throw WorkerFailure(.internalError, "cannot create the scratch directory \(dir): \(errnoText())")
            }
        }
        let options = "lowerdir=\(lower),upperdir=\(scratch)/upper,workdir=\(scratch)/work"
        guard mount("overlay", root, "overlay", 0, options) == 0 else {
            let e = errno
            throw WorkerFailure(.internalError, "cannot mount the exec root (overlayfs over \(lower)) at \(root): \(errnoText(e))\(e == EPERM ? " (the worker must run as root)" : "")")
        }
        mounted = true
    }

    deinit { release() }

    /// Creates (0755) or makes writable (u+w) each directory, given as
    /// components relative to the root, parents first. A component that is
    /// not a directory is left alone: the action meets it as it is.
    func prepare(_ directories: [[String]]) throws(WorkerFailure) {
        for dir in directories {
            let path = ([root] + dir).joined(separator: "/")
            var st = stat()
            if lstat(path, &st) == 0 {
                guard (st.st_mode & S_IFMT) == S_IFDIR else { continue }
                if st.st_mode & S_IWUSR == 0 && chmod(path, (st.st_mode & 0o7777) | S_IWUSR) != 0 {
                    throw WorkerFailure(.internalError, "cannot make \(dir.joined(separator: "/")) writable in the exec root: \(errnoText())")
                }
            } else if errno == ENOENT {
                if mkdir(path, 0o755) != 0 && errno != EEXIST {
                    throw WorkerFailure(.internalError, "cannot create \(dir.joined(separator: "/")) in the exec root: \(errnoText())")
                }
            } else if errno == EIO {
                throw WorkerFailure(.failedPrecondition, "the input directory \(dir.joined(separator: "/")) cannot be read from the CAS (missing or not a REAPI Directory)")
            }
        }
    }

    /// Unmounts the overlay (detached: a process still in it keeps it until
    /// it leaves) and removes the scratch directory.
    func release() {
        if mounted {
            if umount2(root, Int32(MNT_DETACH)) != 0 {
                log.error("cannot unmount the exec root \(root): \(errnoText())")
            }
            mounted = false
        }
        ScratchRemover.remove(scratch)
    }
}

/// Removes a scratch directory tree, however deep, without following
/// symlinks or crossing into other filesystems.
enum ScratchRemover {
    static func remove(_ path: String) {
        do { try TreeRemover.remove(path) } catch {
            log.error("\(error)")
        }
    }
}
