import CASStorage
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// Makes an index agree with its store in the background (blobs on disk the
/// index lacks come back, entries without bytes go): one pass at a time on
/// a thread of its own; a request while a pass runs asks for one more pass
/// after it. The outcome of each pass is logged.
public final class BackgroundReindex: Sendable {
    private let index: RedisIndex
    private let name: String
    private let log: Logger
    private struct State {
        var running = false
        var again = false
        var stopped = false
        var passes = 0
    }
    private let state = Mutex(State())
    private let idle = Mutex<DispatchSemaphore?>(nil)

    /// - Parameter name: what the store is called in the log (its directory).
    public init(index: RedisIndex, name: String, log: Logger) {
        self.index = index
        self.name = name
        self.log = log
    }

    /// Asks for a pass (started now unless one runs; then once it ends).
    public func request() {
        let start = state.withLock { s -> Bool in
            if s.stopped { return false }
            if s.running {
                s.again = true
                return false
            }
            s.running = true
            return true
        }
        if start { launch() }
    }

    /// Passes completed so far.
    public var passes: Int { state.withLock { $0.passes } }

    /// True while a pass runs or is asked for.
    public var isBusy: Bool { state.withLock { $0.running } }

    /// No more passes; waits up to `timeout` seconds for the running one
    /// (a reconcile cannot be interrupted; past the wait it ends on its own).
    public func stop(timeout: Double = 10) {
        let done = DispatchSemaphore(value: 0)
        let wait = state.withLock { s -> Bool in
            s.stopped = true
            s.again = false
            if s.running { idle.withLock { $0 = done } }
            return s.running
        }
        if wait { _ = done.wait(timeout: .now() + timeout) }
    }

    private func launch() {
        let t = Thread { [self] in
            while true {
                pass()
                let more = state.withLock { s -> Bool in
                    s.passes += 1
                    if s.again && !s.stopped {
                        s.again = false
                        return true
                    }
                    s.running = false
                    return false
                }
                if !more { break }
            }
            idle.withLock { $0?.signal(); $0 = nil }
        }
        t.name = "casfs-reindex"
        t.start()
    }

    private func pass() {
        do {
            let r = try index.reconcile()
            if r.added > 0 || r.dropped > 0 {
                log.notice("reindexed \(name): \(r.added) blobs added, \(r.dropped) entries without bytes dropped")
            }
        } catch {
            log.error("reindexing \(name) failed: \(error)")
        }
    }
}

/// `BackgroundReindex` as a service: a pass at start (`initialPass`), and
/// whenever asked; stopped at shutdown.
public struct ReindexService: Service {
    public let reindex: BackgroundReindex
    private let initialPass: Bool

    public init(_ reindex: BackgroundReindex, initialPass: Bool = true) {
        self.reindex = reindex
        self.initialPass = initialPass
    }

    public func run() async throws {
        if initialPass { reindex.request() }
        await untilShutdown { reindex.stop() }
    }
}
