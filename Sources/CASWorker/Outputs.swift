import CASCore
import CASTree
import Foundation
import REAPI
import SwiftProtobuf

/// What the action left at its output paths, ready for the ActionResult,
/// and the blobs to send: files as paths on local disk, `Tree` messages as bytes.
struct CollectedOutputs {
    var files: [Build_Bazel_Remote_Execution_V2_OutputFile] = []
    var directories: [Build_Bazel_Remote_Execution_V2_OutputDirectory] = []
    /// Symlinks at output paths (REAPI 2.1 `output_symlinks`).
    var symlinks: [Build_Bazel_Remote_Execution_V2_OutputSymlink] = []
    /// The same, split by what was asked for (REAPI 2.0 fields, which Bazel 4 reads).
    var fileSymlinks: [Build_Bazel_Remote_Execution_V2_OutputSymlink] = []
    var directorySymlinks: [Build_Bazel_Remote_Execution_V2_OutputSymlink] = []
    var fileBlobs: [Digest: String] = [:]
    var dataBlobs: [Digest: Data] = [:]
}

/// Reads the outputs a `Command` names from the exec root after the run.
/// Paths are relative to the working directory. An output that is absent is
/// left out (REAPI: the client decides whether that is an error); a symlink
/// is reported as a symlink, never followed; a file is executable when its
/// owner may execute it; an output directory becomes a REAPI `Tree` (its
/// root and every directory below it, each once).
struct OutputCollector {
    let root: String
    let paths: CommandPaths

    func collect() throws(WorkerFailure) -> CollectedOutputs {
        var out = CollectedOutputs()
        for p in paths.files {
            try collect(p, kind: .file, into: &out)
        }
        for p in paths.directories {
            try collect(p, kind: .directory, into: &out)
        }
        for p in paths.paths {
            try collect(p, kind: .any, into: &out)
        }
        return out
    }

    enum Kind { case file, directory, any }

    private func hostPath(_ given: String) -> String {
        var parts = [root] + paths.workingDirectory
        if !given.isEmpty, let c = try? CommandPaths.components(given, what: "output") { parts += c }
        return parts.joined(separator: "/")
    }

    private func collect(_ given: String, kind: Kind, into out: inout CollectedOutputs) throws(WorkerFailure) {
        let path = hostPath(given)
        var st = stat()
        guard lstat(path, &st) == 0 else {
            if errno == ENOENT || errno == ENOTDIR { return }
            throw WorkerFailure(.internalError, "cannot read the output \(given): \(errnoText())")
        }
        let name = given.hasSuffix("/") ? String(given.dropLast()) : given
        switch st.st_mode & S_IFMT {
        case S_IFLNK:
            var link = Build_Bazel_Remote_Execution_V2_OutputSymlink()
            link.path = name
            link.target = try readLink(path, given)
            out.symlinks.append(link)
            switch kind {
            case .file: out.fileSymlinks.append(link)
            case .directory: out.directorySymlinks.append(link)
            case .any:
                var target = stat()
                if stat(path, &target) == 0 && (target.st_mode & S_IFMT) == S_IFDIR {
                    out.directorySymlinks.append(link)
                } else {
                    out.fileSymlinks.append(link)
                }
            }
        case S_IFREG:
            guard kind != .directory else {
                throw WorkerFailure(.failedPrecondition, "the output directory \(given) is a file")
            }
            let digest = try hashFile(path, given)
            var f = Build_Bazel_Remote_Execution_V2_OutputFile()
            f.path = name
            f.digest = REDigest(digest)
            f.isExecutable = st.st_mode & S_IXUSR != 0
            out.files.append(f)
            out.fileBlobs[digest] = path
        case S_IFDIR:
            guard kind != .file else {
                throw WorkerFailure(.failedPrecondition, "the output file \(given) is a directory")
            }
            var tree = RETree()
            var seen = Set<Digest>()
            let (rootMessage, rootDigest) = try directory(path, given: given, tree: &tree, seen: &seen, out: &out)
            tree.root = rootMessage
            let bytes: Data
            do { bytes = try tree.serializedBytes() } catch {
                throw WorkerFailure(.internalError, "cannot encode the Tree of \(given): \(error)")
            }
            let treeDigest = Digest.of(bytes)
            out.dataBlobs[treeDigest] = bytes
            var d = Build_Bazel_Remote_Execution_V2_OutputDirectory()
            d.path = name
            d.treeDigest = REDigest(treeDigest)
            // TREE_ONLY: root_directory_digest would promise each Directory
            // blob in the CAS as well, which only the Tree holds.
            _ = rootDigest
            out.directories.append(d)
        default:
            throw WorkerFailure(.failedPrecondition, "the output \(given) is neither a file, a directory nor a symlink")
        }
    }

    /// The canonical `Directory` of `path` (children first into `tree`).
    private func directory(_ path: String, given: String, tree: inout RETree, seen: inout Set<Digest>,
                           out: inout CollectedOutputs) throws(WorkerFailure) -> (REDirectory, Digest) {
        let names: [String]
        do { names = try FileManager.default.contentsOfDirectory(atPath: path) } catch {
            throw WorkerFailure(.internalError, "cannot list the output directory \(given): \(error)")
        }
        var builder = DirectoryBuilder()
        for name in names {
            let child = path + "/" + name
            var st = stat()
            guard lstat(child, &st) == 0 else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFREG:
                let d = try hashFile(child, given + "/" + name)
                out.fileBlobs[d] = child
                builder.addFile(name, d, executable: st.st_mode & S_IXUSR != 0)
            case S_IFDIR:
                let (message, d) = try directory(child, given: given + "/" + name, tree: &tree, seen: &seen, out: &out)
                if seen.insert(d).inserted { tree.children.append(message) }
                builder.addDirectory(name, d)
            case S_IFLNK:
                builder.addSymlink(name, target: try readLink(child, given + "/" + name))
            default:
                throw WorkerFailure(.failedPrecondition, "\(given)/\(name) in an output directory is neither a file, a directory nor a symlink")
            }
        }
        let bytes: Data
        do { bytes = try builder.encoded() } catch {
            throw WorkerFailure(.failedPrecondition, "the output directory \(given) cannot be a REAPI Directory: \(error)")
        }
        let message: REDirectory
        do { message = try REDirectory(serializedBytes: bytes) } catch {
            throw WorkerFailure(.internalError, "cannot decode the Directory of \(given): \(error)")
        }
        return (message, Digest.of(bytes))
    }

    private func readLink(_ path: String, _ given: String) throws(WorkerFailure) -> String {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink(path, &buf, buf.count - 1)
        guard n >= 0 else { throw WorkerFailure(.internalError, "cannot read the symlink \(given): \(errnoText())") }
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private func hashFile(_ path: String, _ given: String) throws(WorkerFailure) -> Digest {
        do { return try FileSource(path: path).computeDigest() } catch {
            throw WorkerFailure(.internalError, "cannot read the output \(given): \(error)")
        }
    }
}

/// Sends blobs to the CAS: asks which are missing (FindMissingBlobs) and
/// sends only those, small ones in batches and large ones streamed.
struct ResultUploader {
    let cas: any Storage
    let metrics: WorkerMetrics?
    static let batchLimit = 1 << 20

    func upload(files: [Digest: String], data: [Digest: Data]) throws(WorkerFailure) {
        let all = Array(Set(files.keys).union(data.keys)).filter { !$0.isEmpty }
        guard !all.isEmpty else { return }
        let missing: [Digest]
        do { missing = try cas.missingBlobs(all) } catch {
            throw WorkerFailure(.unavailable, "cannot ask the CAS which outputs it lacks: \(error)")
        }
        var batch: [(Digest, Data)] = []
        var batchBytes = 0
        func flush() throws(WorkerFailure) {
            guard !batch.isEmpty else { return }
            let results = cas.bulkUpdateBlobs(batch)
            for (i, r) in results.enumerated() where r != nil {
                throw WorkerFailure(.unavailable, "cannot store the output blob \(batch[i].0) in the CAS: \(r!)")
            }
            metrics?.bytes.add(batchBytes)
            metrics?.blobs.add(batch.count)
            batch = []
            batchBytes = 0
        }
        for d in missing {
            if let bytes = data[d] {
                if batchBytes + bytes.count > Self.batchLimit { try flush() }
                batch.append((d, bytes))
                batchBytes += bytes.count
            } else if let path = files[d] {
                do {
                    let source = try FileSource(path: path)
                    if d.size <= Int64(Self.batchLimit / 4) {
                        let bytes = try source.readAll()
                        guard Digest.of(bytes) == d else {
                            throw WorkerFailure(.internalError, "the output \(path) changed while it was being stored")
                        }
                        if batchBytes + bytes.count > Self.batchLimit { try flush() }
                        batch.append((d, bytes))
                        batchBytes += bytes.count
                    } else {
                        try cas.commitWrite(d, source)
                        metrics?.bytes.add(d.size)
                        metrics?.blobs.add()
                    }
                } catch let e as WorkerFailure {
                    throw e
                } catch {
                    throw WorkerFailure(.unavailable, "cannot store the output blob \(d) in the CAS: \(error)")
                }
            }
        }
        try flush()
    }
}
