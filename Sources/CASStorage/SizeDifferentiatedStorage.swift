import CASCore
import Foundation

/// Blobs placed by size, with BuildGrid's `!size-differentiated-storage`
/// choice: the size-limited storages are taken in ascending order of their
/// limit and a blob goes to the first whose limit is strictly above its size
/// (`max-size: 1M` holds sizes up to 1 MiB - 1); larger blobs go to the
/// fallback. Unlike BuildGrid, starting and stopping reach the fallback too.
public final class SizeDifferentiatedStorage: DigestRouting {
    public struct Tier: Sendable {
        public let maxSize: Int64
        public let storage: any Storage
        public init(maxSize: Int64, storage: any Storage) {
            self.maxSize = maxSize
            self.storage = storage
        }
    }

    /// In ascending order of limit (equal limits keep their given order).
    public let tiers: [Tier]
    public let fallback: any Storage
    /// The tiers' storages, then the fallback.
    public let children: [any Storage]
    public let fanOut: FanOut

    /// `threadPoolSize`: per-storage calls of one bulk operation run at the
    /// same time, at most this many at once; 0 runs them one after another.
    public init(tiers: [Tier], fallback: any Storage, threadPoolSize: Int) {
        self.tiers = tiers.enumerated().sorted { a, b in
            a.element.maxSize != b.element.maxSize ? a.element.maxSize < b.element.maxSize : a.offset < b.offset
        }.map(\.element)
        self.fallback = fallback
        self.children = self.tiers.map(\.storage) + [fallback]
        self.fanOut = FanOut(width: threadPoolSize, label: "casfs.size-differentiated")
    }

    public func childIndex(for d: Digest) -> Int {
        tiers.firstIndex { d.size < $0.maxSize } ?? tiers.count
    }
}
