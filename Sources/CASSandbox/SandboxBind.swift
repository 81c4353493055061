import Foundation

/// A host path shown inside the sandbox: `source` on the host at
/// `destination` inside, writable or read-only.
public struct SandboxBind: Equatable, Sendable {
    public var source: String
    public var destination: String
    public var writable: Bool

    public init(source: String, destination: String, writable: Bool) {
        self.source = source
        self.destination = destination
        self.writable = writable
    }

    /// Parses `SRC[:DST]` as given to a command-line `option` (DST defaults
    /// to SRC). SRC is made absolute from the current directory; DST must be
    /// absolute, without `.` or `..` components, and may not be `/` or hide
    /// one of `reserved` (casfs run's /input, /out, /cas).
    public static func parse(_ spec: String, option: String, writable: Bool,
                             reserved: [String] = Sandbox.reserved) throws -> SandboxBind {
        let source: String
        let destination: String
        if let colon = spec.firstIndex(of: ":") {
            source = String(spec[..<colon])
            destination = String(spec[spec.index(after: colon)...])
        } else {
            source = spec
            destination = SandboxPath.absolute(spec)
        }
        guard !source.isEmpty else { throw SandboxError("\(option) \(spec): the host path is empty") }
        return SandboxBind(source: SandboxPath.absolute(source),
                           destination: try checkedDestination(destination, spec: spec, option: option, reserved: reserved),
                           writable: writable)
    }

    /// `path` without a trailing slash, if it is a plain absolute path that
    /// leaves `/` and the `reserved` paths visible.
    public static func checkedDestination(_ path: String, spec: String, option: String,
                                          reserved: [String] = Sandbox.reserved) throws -> String {
        guard path.hasPrefix("/") else {
            throw SandboxError("\(option) \(spec): the path inside, '\(path)', is not absolute")
        }
        let parts = path.split(separator: "/", omittingEmptySubsequences: true)
        guard !parts.contains(where: { $0 == "." || $0 == ".." }) else {
            throw SandboxError("\(option) \(spec): the path inside, '\(path)', has . or .. components")
        }
        let clean = "/" + parts.joined(separator: "/")
        if clean == "/" || reserved.contains(where: { clean == $0 || clean.hasPrefix($0 + "/") }) {
            throw SandboxError("\(option) \(spec): \(clean) would hide the sandbox's \(reserved.joined(separator: ", ")) or /")
        }
        return clean
    }

    /// Throws unless the host path exists (a directory, file or socket:
    /// whatever the caller names is shown).
    public func checkSource(option: String) throws {
        var st = stat()
        guard stat(source, &st) == 0 else {
            throw SandboxError("\(option) \(source): \(String(cString: strerror(errno)))")
        }
    }

    /// bwrap's arguments for this bind.
    public var bwrapArguments: [String] { [writable ? "--bind" : "--ro-bind", source, destination] }
}

/// One filesystem operation of the sandbox, done in order after the
/// system directories and the fixed paths (/cas, /input, /out).
public enum SandboxMount: Equatable, Sendable {
    /// A host path at a path inside (see `SandboxBind`).
    case bind(SandboxBind)
    /// An empty writable tmpfs at a path inside.
    case tmpfs(String)
    /// An empty directory (on whatever holds its parent).
    case directory(String)
    /// A symbolic link at `path` pointing to `target`.
    case symlink(target: String, path: String)
    /// Makes what is at the path (and under it) read-only.
    case remountReadOnly(String)

    public var bwrapArguments: [String] {
        switch self {
        case .bind(let b): b.bwrapArguments
        case .tmpfs(let p): ["--tmpfs", p]
        case .directory(let p): ["--dir", p]
        case .symlink(let target, let path): ["--symlink", target, path]
        case .remountReadOnly(let p): ["--remount-ro", p]
        }
    }

    /// The path inside that the operation makes.
    public var path: String {
        switch self {
        case .bind(let b): b.destination
        case .tmpfs(let p), .directory(let p), .remountReadOnly(let p): p
        case .symlink(_, let path): path
        }
    }
}
