import CLinux
import Foundation

/// A one-line error for the user; the command exits non-zero.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Prints `casfs: <error>` to stderr.
func printError(_ message: Any) {
    FileHandle.standardError.write(Data("casfs: \(message)\n".utf8))
}

/// Formats a byte count for people: `1.5 GiB`.
func humanBytes(_ n: Int64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    var v = Double(n)
    var i = 0
    while abs(v) >= 1024 && i < units.count - 1 {
        v /= 1024
        i += 1
    }
    return i == 0 ? "\(n) B" : String(format: "%.1f %@", v, units[i])
}

/// Makes standard output line-buffered, so each line reaches a pipe or a log
/// file as it is printed.
func lineBufferStdout() {
    casfs_line_buffer_stdout()
}

/// `path` made absolute from the current directory.
func absolute(_ path: String) -> String {
    path.hasPrefix("/") ? path : URL(fileURLWithPath: FileManager.default.currentDirectoryPath + "/" + path).standardizedFileURL.path
}
