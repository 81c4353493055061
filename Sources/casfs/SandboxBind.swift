import Foundation

/// A host path the caller asked to show inside the sandbox (--bind,
/// --ro-bind, --writable-dir): `source` on the host at `destination` inside.
struct SandboxBind: Equatable {
    var source: String
    var destination: String
    var writable: Bool

    /// Parses `SRC[:DST]` as given to `option` (DST defaults to SRC). SRC is
    /// made absolute from the current directory; DST must be absolute,
    /// without `.` or `..` components, and may not be `/` or hide the
    /// sandbox's own /input, /out, /cas.
    static func parse(_ spec: String, option: String, writable: Bool) throws -> SandboxBind {
        let source: String
        let destination: String
        if let colon = spec.firstIndex(of: ":") {
            source = String(spec[..<colon])
            destination = String(spec[spec.index(after: colon)...])
        } else {
            source = spec
            destination = URL(fileURLWithPath: absolute(spec)).standardizedFileURL.path
        }
        guard !source.isEmpty else { throw CLIError("\(option) \(spec): the host path is empty") }
        return SandboxBind(source: absolute(source),
                           destination: try checkedDestination(destination, spec: spec, option: option),
                           writable: writable)
    }

    /// `path` without a trailing slash, if it is a plain absolute path that
    /// leaves the sandbox's fixed paths visible.
    static func checkedDestination(_ path: String, spec: String, option: String) throws -> String {
        guard path.hasPrefix("/") else {
            throw CLIError("\(option) \(spec): the path inside, '\(path)', is not absolute")
        }
        let parts = path.split(separator: "/", omittingEmptySubsequences: true)
        guard !parts.contains(where: { $0 == "." || $0 == ".." }) else {
            throw CLIError("\(option) \(spec): the path inside, '\(path)', has . or .. components")
        }
        let clean = "/" + parts.joined(separator: "/")
        if clean == "/" || Sandbox.reserved.contains(where: { clean == $0 || clean.hasPrefix($0 + "/") }) {
            throw CLIError("\(option) \(spec): \(clean) would hide the sandbox's \(Sandbox.reserved.joined(separator: ", ")) or /")
        }
        return clean
    }

    /// Throws unless the host path exists (a directory, file or socket:
    /// whatever the caller names is shown).
    func checkSource(option: String) throws {
        var st = stat()
        guard stat(source, &st) == 0 else {
            throw CLIError("\(option) \(source): \(String(cString: strerror(errno)))")
        }
    }

    /// bwrap's arguments for this bind.
    var bwrapArguments: [String] { [writable ? "--bind" : "--ro-bind", source, destination] }
}
