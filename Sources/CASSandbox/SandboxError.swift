import Foundation

/// A sandbox that cannot be set up or run, or an argument that names no
/// usable path: one line that says why.
public struct SandboxError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Paths as the sandbox's callers give them.
public enum SandboxPath {
    /// `path` made absolute from the current directory, `.` and `..` resolved textually.
    public static func absolute(_ path: String) -> String {
        let full = path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
        return URL(fileURLWithPath: full).standardizedFileURL.path
    }
}
