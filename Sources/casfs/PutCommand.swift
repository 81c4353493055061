import ArgumentParser
import CASConfig
import CASCore
import CASStorage
import Foundation

struct PutCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "put",
        abstract: "Store files (directories recursively) and print their digest paths.",
        discussion: """
            Prints `sha256/<hash>_<size>  PATH` per file. Each file is read once:
            hashed while it is read. Exits non-zero, naming each file that failed.
            """)

    @Option(name: .long, help: "YAML config; without it, the zero-config default store.")
    var config: String?

    @Flag(name: .long, help: "Never show a progress bar.")
    var quiet = false

    @Argument(help: "Files or directories to store.")
    var paths: [String]

    /// Files up to this size are read into memory and stored in batches.
    static let smallFileLimit = 1 << 20
    /// A batch of small files is flushed at this many files or bytes.
    static let batchFiles = 500
    static let batchBytes = 8 << 20

    func run() throws {
        let files: [String]
        do { files = try collectFiles(paths) } catch {
            printError(error)
            throw ExitCode.failure
        }
        let stack: OpenStack
        do { stack = try OpenStack(configPath: config) } catch {
            printError(error)
            throw ExitCode.failure
        }
        defer { stack.close() }
        let storage = stack.config.storage
        do { try storage.start() } catch {
            printError(error)
            throw ExitCode.failure
        }

        let progress = Progress(enabled: !quiet && isatty(2) != 0)
        var failed: [String] = []
        var batch: [(path: String, digest: Digest, data: Data)] = []
        var batchBytes = 0

        func flush() {
            guard !batch.isEmpty else { return }
            let statuses = storage.bulkUpdateBlobs(batch.map { ($0.digest, $0.data) })
            for (item, status) in zip(batch, statuses) {
                if let status {
                    printError("\(item.path): \(status)")
                    failed.append(item.path)
                } else {
                    print("sha256/\(item.digest)  \(item.path)")
                }
            }
            batch.removeAll(keepingCapacity: true)
            batchBytes = 0
        }

        for path in files {
            do {
                let src = try FileSource(path: path)
                if src.size <= Int64(PutCommand.smallFileLimit) {
                    let data = try src.readAll()
                    batch.append((path, Digest.of(data), data))
                    batchBytes += data.count
                    if batch.count >= PutCommand.batchFiles || batchBytes >= PutCommand.batchBytes { flush() }
                } else {
                    flush()
                    let (digest, staged) = try stage(src, path: path, progress: progress)
                    try storage.commitWrite(digest, staged)
                    progress.finish()
                    print("sha256/\(digest)  \(path)")
                }
            } catch {
                progress.finish()
                printError("\(path): \(error)")
                failed.append(path)
            }
        }
        flush()
        if !failed.isEmpty {
            printError("\(failed.count) file(s) failed: \(failed.joined(separator: ", "))")
            throw ExitCode.failure
        }
    }

    /// Copies a large file into an anonymous staging file while hashing it, so the
    /// input is read once and what is committed cannot change under us.
    private func stage(_ src: FileSource, path: String, progress: Progress) throws -> (Digest, FileSource) {
        let dir = FileManager.default.temporaryDirectory.path
        let fd = try openAnonymousFile(in: dir)
        let staged = FileSource(fd: fd, size: src.size)
        var hasher = DigestHasher()
        var done: Int64 = 0
        try src.forEachChunk { chunk in
            hasher.update(chunk)
            try chunk.withUnsafeBytes { try writeFully(fd, $0) }
            done += Int64(chunk.count)
            progress.update(path, done: done, total: src.size)
        }
        return (hasher.finalize(), staged)
    }
}

/// Regular files under `paths`, in a stable order; symlinks are followed for
/// named files and not descended into inside directories.
func collectFiles(_ paths: [String]) throws -> [String] {
    var out: [String] = []
    for p in paths {
        var st = stat()
        guard stat(p, &st) == 0 else { throw CLIError("\(p): \(String(cString: strerror(errno)))") }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            guard let e = FileManager.default.enumerator(atPath: p) else { throw CLIError("\(p): cannot list") }
            var found: [String] = []
            while let rel = e.nextObject() as? String {
                let full = p.hasSuffix("/") ? p + rel : p + "/" + rel
                var lst = stat()
                if lstat(full, &lst) == 0, (lst.st_mode & S_IFMT) == S_IFREG { found.append(full) }
            }
            out += found.sorted()
        } else if (st.st_mode & S_IFMT) == S_IFREG {
            out.append(p)
        } else {
            throw CLIError("\(p): not a regular file or directory")
        }
    }
    return out
}

/// A one-line progress bar on stderr, redrawn at most ten times a second.
final class Progress {
    let enabled: Bool
    private var lastDraw = Date.distantPast
    private var start = Date()
    private var drawn = false

    init(enabled: Bool) { self.enabled = enabled }

    func update(_ name: String, done: Int64, total: Int64) {
        guard enabled else { return }
        if !drawn { start = Date() }
        let now = Date()
        guard now.timeIntervalSince(lastDraw) >= 0.1 || done == total else { return }
        lastDraw = now
        let fraction = total > 0 ? Double(done) / Double(total) : 1
        let width = 30
        let filled = Int(fraction * Double(width))
        let rate = Double(done) / max(now.timeIntervalSince(start), 0.001)
        let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
        let line = String(format: "\r[%@] %3d%% %@ of %@, %@/s  %@", bar, Int(fraction * 100),
                          humanBytes(done), humanBytes(total), humanBytes(Int64(rate)), (name as NSString).lastPathComponent)
        FileHandle.standardError.write(Data(line.utf8))
        drawn = true
    }

    func finish() {
        guard enabled, drawn else { return }
        FileHandle.standardError.write(Data("\r\u{1b}[K".utf8))
        drawn = false
    }
}
