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
