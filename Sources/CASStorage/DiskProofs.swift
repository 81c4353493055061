import CASCore
import Foundation
import Synchronization

/// What a store file's proof binds: the file (its inode), its length and its
/// last change (ctime). Every change made through the filesystem (data,
/// mtime set back with `touch -r`, mode, owner, extended attributes, links)
/// moves ctime to the current time, and no program can set it back.
public struct FileStamp: Equatable, Sendable, CustomStringConvertible {
    public var inode: UInt64
    public var size: Int64
    public var ctimeSeconds: Int64
    public var ctimeNanos: Int64
    /// Not part of a proof (a change of mtime moves ctime too); compared
    /// to tell whether a file changed while it was read.
    public var mtimeSeconds: Int64
    public var mtimeNanos: Int64

    public init(_ st: stat) {
        inode = UInt64(st.st_ino)
        size = Int64(st.st_size)
        ctimeSeconds = Int64(st.st_ctim.tv_sec)
        ctimeNanos = Int64(st.st_ctim.tv_nsec)
        mtimeSeconds = Int64(st.st_mtim.tv_sec)
        mtimeNanos = Int64(st.st_mtim.tv_nsec)
    }

    /// A stamp as a proof records it (no mtime).
    init(inode: UInt64, size: Int64, ctimeSeconds: Int64, ctimeNanos: Int64) {
        self.inode = inode
        self.size = size
        self.ctimeSeconds = ctimeSeconds
        self.ctimeNanos = ctimeNanos
        mtimeSeconds = 0
        mtimeNanos = 0
    }

    /// The stamp of an open file, or nil if fstat fails.
    public static func of(fd: Int32) -> FileStamp? {
        var st = stat()
        return fstat(fd, &st) == 0 ? FileStamp(st) : nil
    }

    /// The stamp of the file at `path` (not following a symlink), or nil.
    public static func of(path: String) -> FileStamp? {
        var st = stat()
        return lstat(path, &st) == 0 ? FileStamp(st) : nil
    }

    /// What a proof records (inode, size, ctime).
    public func proves(_ other: FileStamp) -> Bool {
        inode == other.inode && size == other.size && ctimeSeconds == other.ctimeSeconds && ctimeNanos == other.ctimeNanos
    }

    public var description: String { "inode \(inode), \(size) bytes, ctime \(ctimeSeconds).\(ctimeNanos)" }
}

/// Proofs that store files hold the bytes their names say, so a verified
/// file is not hashed again.
///
/// A proof binds the file's inode, size and change time (ctime). It cannot
/// live on the file itself: setting an extended attribute moves the file's
/// ctime, so no value stored on the file can name the ctime the file has
/// after the value is stored. Proofs are therefore kept beside the store:
/// - for files of at least `recordThreshold` bytes, as a record that
///   survives restarts: a symbolic link `<root>/casfs-proofs/<hash[0:2]>/<hash[2:]>`
///   whose target is the text `casfs-proof:1 <inode> <size> <ctime s>.<ctime ns>`,
///   written atomically (temporary link, rename) and read with one readlink;
/// - for every proven file, in memory (a bounded table), so opens of small
///   files cost no hashing while the process runs. Small files are hashed
///   again after a restart (cheap), which keeps the record tree to one
///   inode per large object.
/// A change made through the filesystem moves ctime, which voids the proof
/// whatever the writer does to mtime; a proof written by another process
/// (a mount, `casfs scrub`) holds for all of them.
final class DiskProofs: Sendable {
    let directory: String
    let recordThreshold: Int64
    /// False once the record directory refused a write (a read-only store):
    /// proofs are then kept in memory only.
    private let recordsWritable = Atomic<Bool>(true)
    private let memory = Mutex(MemoryProofs())
    static let recordTag = "casfs-proof:1 "
    /// Proofs per memory generation: at most twice this many are held
    /// (about 80 bytes each).
    static let memoryCapacity = 1 << 15

    init(root: String, recordThreshold: Int64 = 1 << 20) {
        directory = root + "/casfs-proofs"
        self.recordThreshold = recordThreshold
    }

    func recordPath(_ d: Digest) -> String {
        let h = d.hash
        let split = h.index(h.startIndex, offsetBy: 2)
        return "\(directory)/\(h[..<split])/\(h[split...])"
    }

    /// True if a proof of `d` names the file with this stamp.
    func isProven(_ d: Digest, _ stamp: FileStamp) -> Bool {
        guard stamp.size == d.size else { return false }
        let key = ProofKey(d)
        if let known = memory.withLock({ $0.find(key) }), known.proves(stamp) { return true }
        guard d.size >= recordThreshold, let recorded = readRecord(d), recorded.proves(stamp) else { return false }
        memory.withLock { $0.insert(key, MemoryProof(stamp)) }
        return true
    }

    /// Records that the file with `stamp` holds `d`'s bytes.
    func record(_ d: Digest, _ stamp: FileStamp) {
        guard stamp.size == d.size else { return }
        memory.withLock { $0.insert(ProofKey(d), MemoryProof(stamp)) }
        if d.size >= recordThreshold { writeRecord(d, stamp) }
    }

    /// Drops every proof of `d` (its file is being removed or replaced).
    func forget(_ d: Digest) {
        memory.withLock { $0.remove(ProofKey(d)) }
        if d.size >= recordThreshold {
            recordPath(d).withCString { _ = unlink($0) }
        }
    }

    // MARK: records

    func readRecord(_ d: Digest) -> FileStamp? {
        withUnsafeTemporaryAllocation(of: CChar.self, capacity: 128) { buf -> FileStamp? in
            let n = readlink(recordPath(d), buf.baseAddress!, buf.count)
            guard n > 0, n < buf.count else { return nil }
            let text = String(decoding: UnsafeRawBufferPointer(start: buf.baseAddress!, count: n), as: UTF8.self)
            return DiskProofs.parse(text)
        }
    }

    static func format(_ s: FileStamp) -> String {
        var ns = String(s.ctimeNanos)
        ns = String(repeating: "0", count: max(0, 9 - ns.count)) + ns
        return "\(recordTag)\(s.inode) \(s.size) \(s.ctimeSeconds).\(ns)"
    }

    /// The stamp a record names; nil for anything else (records are read
    /// from disk: every number is checked).
    static func parse(_ text: String) -> FileStamp? {
        guard text.hasPrefix(recordTag) else { return nil }
        let parts = text.dropFirst(recordTag.count).split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, let inode = UInt64(parts[0]), let size = Int64(parts[1]), size >= 0 else { return nil }
        let time = parts[2].split(separator: ".", omittingEmptySubsequences: false)
        guard time.count == 2, time[1].count == 9, let sec = Int64(time[0]), let nsec = Int64(time[1]), nsec >= 0 else {
            return nil
        }
        return FileStamp(inode: inode, size: size, ctimeSeconds: sec, ctimeNanos: nsec)
    }

    private func writeRecord(_ d: Digest, _ stamp: FileStamp) {
        guard recordsWritable.load(ordering: .relaxed) else { return }
        let path = recordPath(d)
        let temp = "\(path).\(UInt32.random(in: 0...UInt32.max)).tmp"
        let target = DiskProofs.format(stamp)
        var rc = symlink(target, temp)
        if rc != 0 && errno == ENOENT {
            let dir = String(path[..<path.lastIndex(of: "/")!])
            do {
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            } catch {
                refuseRecords("cannot create \(dir): \(error.localizedDescription)")
                return
            }
            rc = symlink(target, temp)
        }
        guard rc == 0 else {
            refuseRecords("cannot write a proof record in \(directory): \(String(cString: strerror(errno)))")
            return
        }
        if rename(temp, path) != 0 {
            unlink(temp)
            log.debug("proof record of \(d) not kept: \(String(cString: strerror(errno)))")
        }
    }

    private func refuseRecords(_ why: String) {
        if recordsWritable.exchange(false, ordering: .relaxed) {
            log.warning("\(why); proofs of verified files are kept in memory only (they are checked again after a restart)")
        }
    }

    /// Removes records whose object file is gone (deleted by a program that
    /// does not know about proofs, such as BuildGrid) from the prefix
    /// directory `prefix`, given the object names it holds. Returns how many.
    @discardableResult
    func removeStaleRecords(prefix: String, objects: Set<String>) -> Int {
        let dir = directory + "/" + prefix
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return 0 }
        var removed = 0
        for n in names where !objects.contains(n) {
            // Temporaries of a writer that died, or records of removed objects.
            if n.hasSuffix(".tmp") {
                var st = stat()
                guard lstat(dir + "/" + n, &st) == 0,
                      Double(st.st_mtim.tv_sec) < Date().timeIntervalSince1970 - DiskStorage.staleTemporaryAge else { continue }
            }
            if unlink(dir + "/" + n) == 0 { removed += 1 }
        }
        return removed
    }
}

/// A digest as a compact, fixed-size key (no heap string).
struct ProofKey: Hashable {
    var a: UInt64, b: UInt64, c: UInt64, d: UInt64
    var size: Int64

    init(_ digest: Digest) {
        var words: [UInt64] = [0, 0, 0, 0]
        var i = 0
        var shift = 60
        for ch in digest.hash.utf8 {
            let v = UInt64(ch <= 57 ? ch &- 48 : ch &- 87) & 0xF
            words[i] |= v << UInt64(shift)
            if shift == 0 {
                shift = 60
                i += 1
                if i == 4 { break }
            } else {
                shift -= 4
            }
        }
        (a, b, c, d) = (words[0], words[1], words[2], words[3])
        size = digest.size
    }
}

/// A proof held in memory (the size is part of its key).
struct MemoryProof {
    var inode: UInt64
    var ctimeSeconds: Int64
    var ctimeNanos: Int32

    init(_ s: FileStamp) {
        inode = s.inode
        ctimeSeconds = s.ctimeSeconds
        ctimeNanos = Int32(truncatingIfNeeded: s.ctimeNanos)
    }

    func proves(_ s: FileStamp) -> Bool {
        inode == s.inode && ctimeSeconds == s.ctimeSeconds && Int64(ctimeNanos) == s.ctimeNanos
    }
}

/// Two generations of proofs: when the young one is full it becomes the
/// old one and the previous old one is dropped, so at most `2 × capacity`
/// proofs are held and the recently used ones survive.
struct MemoryProofs {
    var young: [ProofKey: MemoryProof] = [:]
    var old: [ProofKey: MemoryProof] = [:]

    mutating func find(_ k: ProofKey) -> MemoryProof? {
        if let s = young[k] { return s }
        guard let s = old.removeValue(forKey: k) else { return nil }
        insert(k, s)
        return s
    }

    mutating func insert(_ k: ProofKey, _ s: MemoryProof) {
        if young.count >= DiskProofs.memoryCapacity {
            old = young
            young = [:]
        }
        young[k] = s
    }

    mutating func remove(_ k: ProofKey) {
        young[k] = nil
        old[k] = nil
    }
}
