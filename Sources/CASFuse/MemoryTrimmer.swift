import CASCore
import CLinux
import Dispatch
import Synchronization

/// Gives memory back to the system after the kernel forgets many nodes
/// (FORGET after a huge listing): freed heap pages stay with the process
/// until glibc is asked to trim them. At most one trim a second, off the
/// request path, once `threshold` nodes were freed.
final class MemoryTrimmer: Sendable {
    let threshold: Int
    private let state = Mutex<(freed: Int, scheduled: Bool)>((0, false))
    private let trims: MetricCounter?

    init(threshold: Int = 10_000, trims: MetricCounter? = nil) {
        self.threshold = threshold
        self.trims = trims
    }

    func freed(_ n: Int) {
        let schedule = state.withLock { s -> Bool in
            s.freed += n
            guard s.freed >= threshold, !s.scheduled else { return false }
            s.scheduled = true
            return true
        }
        guard schedule else { return }
        DispatchQueue.global(qos: .utility).asyncAfter(deadline: .now() + 1) { [self] in
            state.withLock { $0 = (0, false) }
            _ = casfs_malloc_trim(0)
            trims?.add()
        }
    }
}
