import Foundation

/// The entries under a host directory that the sandbox shows masked: what
/// an unprivileged user could not read (a directory it could not list and
/// enter, a file it could not read), and whatever is not a plain file,
/// directory or symlink (sockets, FIFOs, devices). So a caller running as
/// root does not hand /etc/shadow, a host key or a socket to the command.
public enum HiddenEntries {
    public struct Entry: Equatable, Sendable {
        public var path: String
        public var isDirectory: Bool
    }

    /// Deeper than this, a directory is masked whole rather than walked.
    public static let maximumDepth = 32

    public static func find(under root: String) -> [Entry] {
        var found: [Entry] = []
        walk(root, depth: 0, into: &found)
        return found
    }

    private static func walk(_ dir: String, depth: Int, into found: inout [Entry]) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: dir) else {
            found.append(Entry(path: dir, isDirectory: true))
            return
        }
        for name in names.sorted() {
            let path = dir + "/" + name
            var st = stat()
            guard lstat(path, &st) == 0 else { continue }
            let mode = st.st_mode
            switch mode & S_IFMT {
            case S_IFLNK:
                continue  // what it points to is judged where it lies
            case S_IFDIR:
                if mode & S_IROTH == 0 || mode & S_IXOTH == 0 || depth >= maximumDepth {
                    found.append(Entry(path: path, isDirectory: true))
                } else {
                    walk(path, depth: depth + 1, into: &found)
                }
            case S_IFREG:
                if mode & S_IROTH == 0 { found.append(Entry(path: path, isDirectory: false)) }
            default:
                found.append(Entry(path: path, isDirectory: false))
            }
        }
    }

    /// bwrap's arguments that mask `entries` (already shown read-only): an
    /// empty read-only directory, or /dev/null on a mount without devices,
    /// which cannot be opened.
    public static func bwrapArguments(_ entries: [Entry]) -> [String] {
        entries.flatMap { e in
            e.isDirectory ? ["--tmpfs", e.path, "--remount-ro", e.path] : ["--ro-bind", "/dev/null", e.path]
        }
    }
}
