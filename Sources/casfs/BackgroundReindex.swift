import CASConfig
import CASCore
import CASFuse
import CASStorage
import Foundation
import Logging

/// Adds to `index` the blobs of the disk store it lacks and drops its
/// entries without bytes, on a background queue; the outcome is logged.
func reindexInBackground(_ index: RedisIndex, data: String, log: Logger) {
    DispatchQueue.global(qos: .utility).async {
        do {
            let r = try index.reconcile()
            if r.added > 0 || r.dropped > 0 {
                log.notice("reindexed \(data): \(r.added) blobs added, \(r.dropped) entries without bytes dropped")
            }
        } catch {
            log.error("reindexing \(data) failed: \(error)")
        }
    }
}

/// With `scrub-interval`, re-hashes the stack's disk stores in the
/// background (`BackgroundScrub`); a repaired blob's cached pages are
/// dropped from the kernel. Stop it before the storage stops.
func scrubInBackground(_ stack: StorageStack, _ options: MountOptions, _ fs: CASFileSystem) -> BackgroundScrub? {
    guard options.scrubInterval > 0 else { return nil }
    return BackgroundScrub.start(stack.scrubTargets, interval: options.scrubInterval, rate: options.scrubRate,
                                 metrics: stack.metrics) { [weak fs] d in fs?.blobChanged(d) }
}
