import CLinux
import Foundation
import Synchronization

/// How a long-running daemon asks glibc's allocator to give memory back.
/// Blobs held in memory come and go in sizes of megabytes; by default glibc
/// raises its mmap threshold up to 32 MiB after the first large free, so
/// later blobs land in its heaps, and keeps up to 8 heaps per core, each
/// holding on to what was freed in it. A daemon fixes the threshold (blobs
/// of `mmapThreshold` bytes or more get pages of their own, returned to
/// the kernel when freed), bounds the heaps to `arenas`, and trims the heaps
/// after every `trimAfter` bytes of blobs freed.
public enum MallocTuning {
    public static let mmapThreshold: Int32 = 4 << 20
    public static let arenas: Int32 = 2
    public static let trimAfter: Int64 = 64 << 20

    private static let freedSinceTrim = Atomic<Int64>(0)
    private static let trimming = Atomic<Bool>(false)

    /// Applies the settings to this process (call early, before threads start).
    public static func apply() {
        _ = casfs_mallopt_mmap_threshold(mmapThreshold)
        _ = casfs_mallopt_arena_max(arenas)
    }

    /// `n` bytes of blobs were freed: trims the heaps (on a background
    /// queue, at most one trim under way) once enough were.
    static func noteFreed(_ n: Int64) {
        guard n > 0 else { return }
        let total = freedSinceTrim.add(n, ordering: .relaxed).newValue
        guard total >= trimAfter, !trimming.exchange(true, ordering: .acquiring) else { return }
        DispatchQueue.global(qos: .utility).async {
            freedSinceTrim.store(0, ordering: .relaxed)
            _ = casfs_malloc_trim(0)
            trimming.store(false, ordering: .releasing)
        }
    }
}
