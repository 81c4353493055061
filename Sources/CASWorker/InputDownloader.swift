import CASCore
import CASTree
import Foundation
import REAPI

/// The classic way to stage inputs, kept as a baseline for the benchmarks
/// (`casfs worker --input-staging download`): the whole input root is
/// written to local disk before the action starts. Directories are read
/// breadth first; each directory's files up to 1 MiB are fetched in bulk
/// (BatchReadBlobs on a remote CAS), larger ones one by one.
struct InputDownloader {
    let storage: any Storage
    static let smallFile: Int64 = 1 << 20
    static let batchBytes: Int64 = 4 << 20

    func download(_ root: Digest, into path: String) throws(WorkerFailure) {
        var queue: [(Digest, String)] = [(root, path)]
        while !queue.isEmpty {
            let (digest, dir) = queue.removeFirst()
            let message = try directory(digest)
            var small: [(Digest, [String])] = []
            var byDigest: [Digest: [(String, Bool)]] = [:]
            for f in message.files {
                let d = try f.digest.checked("file \(f.name)")
                byDigest[d, default: []].append((dir + "/" + f.name, f.isExecutable))
            }
            for (d, _) in byDigest where d.size <= Self.smallFile { small.append((d, [])) }
            var batch: [Digest] = []
            var bytes: Int64 = 0
            func flush() throws(WorkerFailure) {
                guard !batch.isEmpty else { return }
                let got: [Digest: Data]
                do { got = try storage.bulkReadBlobs(batch) } catch {
                    throw WorkerFailure(.unavailable, "cannot read input files from the CAS: \(error)")
                }
                for d in batch {
                    guard let data = got[d], Digest.of(data) == d else {
                        throw WorkerFailure(.failedPrecondition, "the input file \(d) is missing from the CAS")
                    }
                    for (p, exe) in byDigest[d] ?? [] { try write(data, to: p, executable: exe) }
                }
                batch = []
                bytes = 0
            }
            for (d, _) in small {
                if d.size == 0 {
                    for (p, exe) in byDigest[d] ?? [] { try write(Data(), to: p, executable: exe) }
                    continue
                }
                if bytes + d.size > Self.batchBytes { try flush() }
                batch.append(d)
                bytes += d.size
            }
            try flush()
            for (d, paths) in byDigest where d.size > Self.smallFile {
                do {
                    guard let source = try storage.getBlob(d) else {
                        throw WorkerFailure(.failedPrecondition, "the input file \(d) is missing from the CAS")
                    }
                    for (p, exe) in paths {
                        let fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, exe ? 0o755 : 0o644)
                        guard fd >= 0 else { throw WorkerFailure(.internalError, "cannot create \(p): \(errnoText())") }
                        defer { close(fd) }
                        try source.forEachChunk { chunk in try Self.writeAll(fd, chunk, p) }
                    }
                } catch let e as WorkerFailure {
                    throw e
                } catch {
                    throw WorkerFailure(.unavailable, "cannot read the input file \(d): \(error)")
                }
            }
            for s in message.symlinks where symlink(s.target, dir + "/" + s.name) != 0 {
                throw WorkerFailure(.internalError, "cannot create the symlink \(s.name): \(errnoText())")
            }
            for sub in message.directories {
                let p = dir + "/" + sub.name
                guard mkdir(p, 0o755) == 0 else {
                    throw WorkerFailure(.internalError, "cannot create \(p): \(errnoText())")
                }
                queue.append((try sub.digest.checked("directory \(sub.name)"), p))
            }
        }
    }

    private func directory(_ d: Digest) throws(WorkerFailure) -> REDirectory {
        do {
            guard let source = try storage.getBlob(d) else {
                throw WorkerFailure(.failedPrecondition, "the input directory \(d) is missing from the CAS")
            }
            let data = try source.readAll()
            guard Digest.of(data) == d else { throw WorkerFailure(.failedPrecondition, "the input directory \(d) does not match its digest") }
            _ = try TreeDirectory(parsing: data)
            return try REDirectory(serializedBytes: data)
        } catch let e as WorkerFailure {
            throw e
        } catch {
            throw WorkerFailure(.failedPrecondition, "the input directory \(d) cannot be read: \(error)")
        }
    }

    private func write(_ data: Data, to path: String, executable: Bool) throws(WorkerFailure) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, executable ? 0o755 : 0o644)
        guard fd >= 0 else { throw WorkerFailure(.internalError, "cannot create \(path): \(errnoText())") }
        defer { close(fd) }
        try Self.writeAll(fd, data, path)
    }

    static func writeAll(_ fd: Int32, _ data: Data, _ path: String) throws(WorkerFailure) {
        let ok = data.withUnsafeBytes { buf -> Bool in
            guard let base = buf.baseAddress else { return true }
            var off = 0
            while off < buf.count {
                let n = Foundation.write(fd, base + off, buf.count - off)
                if n < 0 { if errno == EINTR { continue }; return false }
                off += n
            }
            return true
        }
        guard ok else { throw WorkerFailure(.internalError, "cannot write \(path): \(errnoText())") }
    }
}
