import CASCore
import Foundation

/// A store that can name a few of its blobs at random without walking all
/// of them (a disk store of millions reads one or two directories).
public protocol BlobSampling {
    /// Up to `count` blobs of the store, chosen at random, none written
    /// within the last `settled` seconds (a write in flight may not be indexed yet).
    func sampleBlobs(_ count: Int, settled: Double) -> [Digest]
}

extension DiskStorage: BlobSampling {
    public func sampleBlobs(_ count: Int, settled: Double = 60) -> [Digest] {
        let fm = FileManager.default
        guard count > 0, let prefixes = try? fm.contentsOfDirectory(atPath: objectsDir).filter({ $0.utf8.count == 2 }),
              !prefixes.isEmpty else { return [] }
        let cutoff = Date().timeIntervalSince1970 - settled
        var found: [Digest] = []
        var seen: Set<String> = []
        // Random shard directories until enough names (each holds 1/256 of the store).
        for p in prefixes.shuffled().prefix(8) where found.count < count {
            guard let names = try? fm.contentsOfDirectory(atPath: "\(objectsDir)/\(p)") else { continue }
            for n in names.shuffled() where found.count < count && n.utf8.count == 62 && seen.insert(p + n).inserted {
                var st = stat()
                guard lstat("\(objectsDir)/\(p)/\(n)", &st) == 0, (st.st_mode & S_IFMT) == S_IFREG,
                      Double(st.st_mtim.tv_sec) < cutoff, st.st_size >= 0,
                      let d = try? Digest(hash: p + n, size: Int64(st.st_size)) else { continue }
                found.append(d)
            }
        }
        return found
    }
}
