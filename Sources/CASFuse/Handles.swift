import CASCore
import CASTree
import Synchronization

/// What an open file or directory is, by the handle number the kernel
/// quotes back (`fh`).
enum OpenHandle: Sendable {
    /// A blob opened for reading: its bytes, held for as long as it is open
    /// (a deleted blob stays readable to the end).
    case blob(BlobReadHandle)
    /// A blob being written (staging file).
    case write(WriteHandle)
    /// A directory being listed.
    case directory(DirectoryHandle)
}

final class BlobReadHandle: Sendable {
    let digest: Digest
    let ino: UInt64
    let source: BlobSource
    let mode: PassthroughFiles.Mode

    init(digest: Digest, ino: UInt64, source: BlobSource, mode: PassthroughFiles.Mode) {
        self.digest = digest
        self.ino = ino
        self.source = source
        self.mode = mode
    }
}

/// Handle numbers → open files. Numbers start at 1 (0 means "no handle":
/// requests of open-less opens) and are never reused while the mount lives.
final class HandleTable: Sendable {
    private let state = Mutex<(next: UInt64, open: [UInt64: OpenHandle])>((1, [:]))

    func add(_ h: OpenHandle) -> UInt64 {
        state.withLock { s in
            let fh = s.next
            s.next &+= 1
            s.open[fh] = h
            return fh
        }
    }

    subscript(_ fh: UInt64) -> OpenHandle? { state.withLock { $0.open[fh] } }

    @discardableResult
    func remove(_ fh: UInt64) -> OpenHandle? { state.withLock { $0.open.removeValue(forKey: fh) } }

    func write(_ fh: UInt64) -> WriteHandle? {
        if case .write(let w)? = self[fh] { return w }
        return nil
    }

    var count: Int { state.withLock { $0.open.count } }
}

/// Writes not yet committed, by inode: what `stat` of a name being written
/// shows is the size written so far.
final class WriterTable: Sendable {
    private let state = Mutex<[UInt64: [WriteHandle]]>([:])

    func add(_ w: WriteHandle) { state.withLock { $0[w.ino, default: []].append(w) } }

    func remove(_ w: WriteHandle) {
        state.withLock { s in
            s[w.ino]?.removeAll { $0 === w }
            if s[w.ino]?.isEmpty == true { s[w.ino] = nil }
        }
    }

    /// The writers of `ino`.
    func all(_ ino: UInt64) -> [WriteHandle] { state.withLock { $0[ino] ?? [] } }

    /// The most recent writer of `ino` whose bytes are not committed. Each
    /// writer's state is read outside the table's lock (and without the
    /// writer's own, which a commit holds).
    func latest(_ ino: UInt64) -> WriteHandle? {
        all(ino).last { !$0.isCommitted }
    }

    func active(_ ino: UInt64) -> Bool { latest(ino) != nil }
}

/// Blobs held for open-less reads: the kernel opens files itself, so the
/// daemon holds each inode's blob from its first read (or from the lookup
/// that opened it) until the kernel forgets the inode (a deleted blob stays
/// readable meanwhile). At most `limit` open files and `bytesLimit` bytes of
/// blobs held in memory; beyond that, reads open the blob each time.
final class PinnedSources: Sendable {
    let limit: Int
    let bytesLimit: Int64
    private struct State {
        var held: [UInt64: BlobSource] = [:]
        var files = 0
        var bytes: Int64 = 0
    }
    private let state = Mutex(State())

    init(limit: Int, bytesLimit: Int64 = 64 << 20) {
        self.limit = limit
        self.bytesLimit = bytesLimit
    }

    func source(_ ino: UInt64, open: () throws -> BlobSource?) throws -> BlobSource? {
        if let s = state.withLock({ $0.held[ino] }) { return s }
        guard let s = try open() else { return nil }
        hold(ino, s)
        return s
    }

    /// Holds `source` for `ino` (opened already), if there is room.
    func hold(_ ino: UInt64, _ source: BlobSource) {
        // A source that holds its bytes counts against the byte bound; one
        // that reads a file or a remote as asked (a stream check's progress
        // lives in it) against the count.
        let inMemory = source.heldBytes > 0
        state.withLock { s in
            guard s.held[ino] == nil else { return }
            if inMemory {
                guard s.bytes + source.size <= bytesLimit else { return }
                s.bytes += source.size
            } else {
                guard s.files < limit else { return }
                s.files += 1
            }
            s.held[ino] = source
        }
    }

    func drop(_ ino: UInt64) {
        state.withLock { s in
            guard let src = s.held.removeValue(forKey: ino) else { return }
            if src.heldBytes > 0 { s.bytes -= src.size } else { s.files -= 1 }
        }
    }
}
