import ArgumentParser
import CASConfig
import CASCore
import CASDaemon
import CASStorage
import CASTree
import Foundation

struct PutCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "put",
        abstract: "Store files (directories recursively) and print their digest paths.",
        discussion: """
            Prints `sha256/<hash>_<size>  PATH` per file. Each file is read once:
            hashed while it is read. Exits non-zero, naming each file that failed.

            With --tree, each DIR is stored as a REAPI input root instead: its
            files, a Directory message per directory (files with their executable
            bit, subdirectories, symlinks as they are, empty directories), and
            `tree/<hash>_<size>  DIR` is printed with the root Directory's digest,
            the one Bazel and BuildGrid compute for the same tree. On a mount,
            that tree is the directory <mount>/tree/<hash>_<size>/.
            """)

    @Option(name: .long, help: "YAML config; without it, the zero-config default store.")
    var config: String?

    @Flag(name: .long, help: "Never show a progress bar.")
    var quiet = false

    @Flag(name: .long, help: "Store each directory as a REAPI input root and print its root digest.")
    var tree = false

    @Argument(help: "Files or directories to store.")
    var paths: [String]

    func run() throws {
        var files: [String] = []
        do {
            if tree {
                for p in paths {
                    var st = stat()
                    guard stat(p, &st) == 0 else { throw CLIError("\(p): \(String(cString: strerror(errno)))") }
                    guard (st.st_mode & S_IFMT) == S_IFDIR else { throw CLIError("\(p): not a directory (--tree takes directories)") }
                }
            } else {
                files = try collectFiles(paths)
            }
        } catch {
            printError(error)
            throw ExitCode.failure
        }
        let stack: OpenStack
        do { stack = try OpenStack(configPath: config) } catch {
            printError(error)
            throw ExitCode.failure
        }
        defer { stack.close() }
        let storage = stack.storage
        do { try storage.start() } catch {
            printError(error)
            throw ExitCode.failure
        }

        let uploader = BlobUploader(storage: storage, progress: Progress(enabled: !quiet && isatty(2) != 0))
        if tree {
            for root in paths {
                let before = uploader.failed.count
                var digest: Digest?
                do {
                    digest = try putTree(root, uploader)
                } catch is ExitCode {
                    // A file of the tree failed; it has been reported.
                } catch {
                    printError("\(root): \(error)")
                    uploader.failed.append(root)
                }
                // Every blob of the tree is stored before its root is printed.
                uploader.flush()
                if let digest, uploader.failed.count == before { print("tree/\(digest)  \(root)") }
            }
        } else {
            uploader.onStored = { path, digest in print("sha256/\(digest)  \(path)") }
            for path in files {
                _ = try? uploader.putFile(path)
            }
            uploader.flush()
        }
        if !uploader.failed.isEmpty {
            printError("\(uploader.failed.count) path(s) failed: \(uploader.failed.joined(separator: ", "))")
            throw ExitCode.failure
        }
    }

    /// Stores the tree under `dir` bottom-up and returns its root Directory's
    /// digest. Children are stored (or queued in the current batch) before the
    /// Directory that names them.
    func putTree(_ dir: String, _ uploader: BlobUploader) throws -> Digest {
        var builder = DirectoryBuilder()
        for name in try directoryEntries(dir) {
            let path = dir.hasSuffix("/") ? dir + name : dir + "/" + name
            var st = stat()
            guard lstat(path, &st) == 0 else { throw CLIError("\(path): \(String(cString: strerror(errno)))") }
            switch st.st_mode & S_IFMT {
            case S_IFREG:
                builder.addFile(name, try uploader.putFile(path), executable: st.st_mode & S_IXUSR != 0)
            case S_IFDIR:
                builder.addDirectory(name, try putTree(path, uploader))
            case S_IFLNK:
                builder.addSymlink(name, target: try symlinkTarget(path))
            default:
                throw CLIError("\(path): a socket, FIFO or device cannot be part of an input root")
            }
        }
        let data = try builder.encoded()
        let digest = Digest.of(data)
        uploader.putData(data, digest, label: dir)
        return digest
    }
}

/// Stores files and in-memory blobs: small ones in batches (one pipelined
/// bulk update per batch, of the blobs the store lacks), large ones copied to
/// a staging file while hashed.
/// A file's digest is known as soon as it is read; its batch may be stored later.
final class BlobUploader {
    /// Files up to this size are read into memory and stored in batches.
    static let smallFileLimit = 1 << 20
    /// A batch is flushed at this many blobs or bytes.
    static let batchFiles = 500
    static let batchBytes = 8 << 20

    let storage: any Storage
    let progress: Progress
    /// Called for every blob stored, with the path or label it came from.
    var onStored: ((String, Digest) -> Void)?
    /// Paths that could not be read or stored (each already reported on stderr).
    var failed: [String] = []

    private var batch: [(label: String, digest: Digest, data: Data)] = []
    private var batchBytes = 0

    init(storage: any Storage, progress: Progress) {
        self.storage = storage
        self.progress = progress
    }

    /// Reads and stores one file; returns its digest. Failures are reported,
    /// recorded in `failed`, and thrown.
    @discardableResult
    func putFile(_ path: String) throws -> Digest {
        do {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw StorageError.posix("open") }
            defer { close(fd) }
            // Read to the end of the file, not to the size stat gives (a
            // /proc file says 0, a growing file more later).
            var st = stat()
            let expected = fstat(fd, &st) == 0 ? Int64(st.st_size) : 0
            var head = Data()
            guard try readUpTo(fd, Self.smallFileLimit + 1, into: &head) <= Self.smallFileLimit else {
                let (digest, staged) = try stage(fd, head: head, path: path, expected: expected)
                // The store checks the bytes and skips a blob it has.
                try storage.commitWrite(digest, staged)
                progress.finish()
                onStored?(path, digest)
                return digest
            }
            let digest = Digest.of(head)
            putData(head, digest, label: path)
            return digest
        } catch {
            progress.finish()
            printError("\(path): \(error)")
            failed.append(path)
            throw ExitCode.failure
        }
    }

    /// Reads up to `limit` bytes (or to the end) into `out`; returns how many.
    private func readUpTo(_ fd: Int32, _ limit: Int, into out: inout Data) throws -> Int {
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while out.count < limit {
            let n = read(fd, &buf, min(buf.count, limit - out.count))
            if n < 0 {
                if errno == EINTR { continue }
                throw StorageError.posix("read")
            }
            if n == 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        return out.count
    }

    /// Queues a blob already in memory.
    func putData(_ data: Data, _ digest: Digest, label: String) {
        batch.append((label, digest, data))
        batchBytes += data.count
        if batch.count >= Self.batchFiles || batchBytes >= Self.batchBytes { flush() }
    }

    func flush() {
        guard !batch.isEmpty else { return }
        // As REAPI clients do: ask which blobs the store lacks (which also
        // refreshes the others' access times), send only those.
        let missing: Set<Digest>
        do {
            missing = Set(try storage.missingBlobs(batch.map(\.digest)))
        } catch {
            missing = Set(batch.map(\.digest))
        }
        let toSend = batch.filter { missing.contains($0.digest) }
        var sendStatus: [Digest: StorageError] = [:]
        for (item, status) in zip(toSend, storage.bulkUpdateBlobs(toSend.map { ($0.digest, $0.data) })) {
            if let status { sendStatus[item.digest] = status }
        }
        let statuses = batch.map { sendStatus[$0.digest] }
        for (item, status) in zip(batch, statuses) {
            if let status {
                printError("\(item.label): \(status)")
                failed.append(item.label)
            } else {
                onStored?(item.label, item.digest)
            }
        }
        batch.removeAll(keepingCapacity: true)
        batchBytes = 0
    }

    /// Copies a large file (`head` already read, the rest from `fd` to its
    /// end) into an anonymous staging file while hashing it, so the input is
    /// read once and what is committed cannot change under us.
    private func stage(_ fd: Int32, head: Data, path: String, expected: Int64) throws -> (Digest, FileSource) {
        let dir = FileManager.default.temporaryDirectory.path
        let out = try openAnonymousFile(in: dir)
        var hasher = DigestHasher()
        var done: Int64 = 0
        func take(_ chunk: UnsafeRawBufferPointer) throws {
            hasher.update(chunk)
            try writeFully(out, chunk)
            done += Int64(chunk.count)
            progress.update(path, done: done, total: max(expected, done))
        }
        do {
            try head.withUnsafeBytes { try take($0) }
            var buf = [UInt8](repeating: 0, count: streamChunkSize)
            while true {
                let n = read(fd, &buf, buf.count)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw StorageError.posix("read")
                }
                if n == 0 { break }
                try buf.withUnsafeBytes { try take(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            }
        } catch {
            close(out)
            throw error
        }
        let digest = hasher.finalize()
        return (digest, FileSource(fd: out, size: done, computedDigest: digest))
    }
}

/// The names in a directory, as stored in a tree: they must be valid UTF-8
/// (REAPI names are protobuf strings), so other names are an error, not a guess.
func directoryEntries(_ dir: String) throws -> [String] {
    guard let d = opendir(dir) else { throw CLIError("\(dir): \(String(cString: strerror(errno)))") }
    defer { closedir(d) }
    var names: [String] = []
    while let ent = readdir(d) {
        let raw = withUnsafeBytes(of: ent.pointee.d_name) { buf -> [UInt8] in
            Array(buf.prefix { $0 != 0 })
        }
        if raw == [UInt8(ascii: ".")] || raw == [UInt8(ascii: "."), UInt8(ascii: ".")] { continue }
        guard let name = String(validating: raw, as: UTF8.self) else {
            throw CLIError("\(dir): a name is not valid UTF-8 (\(String(decoding: raw, as: UTF8.self)))")
        }
        names.append(name)
    }
    return names
}

/// A symlink's target exactly as stored (not resolved).
func symlinkTarget(_ path: String) throws -> String {
    var buf = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = buf.withUnsafeMutableBufferPointer { readlink(path, $0.baseAddress!, $0.count) }
    guard n >= 0 else { throw CLIError("\(path): \(String(cString: strerror(errno)))") }
    guard let target = String(validating: buf[0..<n], as: UTF8.self) else {
        throw CLIError("\(path): symlink target is not valid UTF-8")
    }
    return target
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
