import Foundation

/// The paths of a REAPI `Command`, checked: the working directory relative
/// to the input root, every output relative to the working directory, each
/// a plain relative path (no leading `/`, no `.` or `..` component, no empty
/// component) so that nothing reaches outside the exec root.
struct CommandPaths: Sendable, Equatable {
    /// The working directory's components ([] for the exec root itself).
    var workingDirectory: [String]
    /// Outputs that are files (or symlinks to files), as given.
    var files: [String]
    /// Outputs that are directories, as given.
    var directories: [String]
    /// REAPI 2.1 `output_paths`: files, directories or symlinks.
    var paths: [String]

    init(_ command: RECommand) throws(WorkerFailure) {
        workingDirectory = command.workingDirectory.isEmpty
            ? [] : try Self.components(command.workingDirectory, what: "working_directory")
        for p in command.outputFiles { _ = try Self.components(p, what: "output file") }
        for p in command.outputDirectories where !p.isEmpty { _ = try Self.components(p, what: "output directory") }
        for p in command.outputPaths where !p.isEmpty { _ = try Self.components(p, what: "output path") }
        files = command.outputFiles
        directories = command.outputDirectories
        paths = command.outputPaths
    }

    /// `path`'s components, or a failure naming `what` when it is not a
    /// plain relative path.
    static func components(_ path: String, what: String) throws(WorkerFailure) -> [String] {
        guard !path.isEmpty else { throw WorkerFailure(.invalidArgument, "\(what) is empty") }
        guard !path.hasPrefix("/") else { throw WorkerFailure(.invalidArgument, "\(what) '\(path)' is absolute") }
        guard !path.utf8.contains(0) else { throw WorkerFailure(.invalidArgument, "\(what) '\(path)' holds a NUL byte") }
        let parts = path.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        // A trailing slash is allowed ("dir/"); nothing else empty.
        let trimmed = parts.last == "" ? Array(parts.dropLast()) : parts
        guard !trimmed.isEmpty, !trimmed.contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }) else {
            throw WorkerFailure(.invalidArgument, "\(what) '\(path)' is not a plain relative path (empty, '.' or '..' components)")
        }
        return trimmed
    }

    /// Every output with its components relative to the exec root.
    var all: [(given: String, fromRoot: [String])] {
        var out: [(String, [String])] = []
        for p in files + directories + paths {
            if p.isEmpty {
                out.append((p, workingDirectory))
            } else if let c = try? Self.components(p, what: "output") {
                out.append((p, workingDirectory + c))
            }
        }
        return out
    }

    /// The directories to create before the run, relative to the exec root
    /// (each output's parent, and the working directory), parents first,
    /// each once.
    var directoriesToPrepare: [[String]] {
        var seen = Set<[String]>()
        var result: [[String]] = []
        func add(_ dir: [String]) {
            for n in 0...dir.count {
                let prefix = Array(dir.prefix(n))
                if seen.insert(prefix).inserted { result.append(prefix) }
            }
        }
        add(workingDirectory)
        for (_, c) in all where !c.isEmpty { add(Array(c.dropLast())) }
        return result
    }
}
