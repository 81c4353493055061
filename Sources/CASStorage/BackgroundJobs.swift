import Foundation
import Synchronization

/// Background jobs (deferred writes, prefetches) run by a fixed set of
/// threads in order of submission. `drain()` waits until the queue is empty
/// and every job has finished.
final class BackgroundJobs: Sendable {
    typealias Job = @Sendable () -> Void

    private struct State {
        var queue: [Job] = []
        var head = 0
        var running = 0
        var stopping = false
        var pending: Int { queue.count - head + running }
    }

    private let state = Mutex(State())
    private let wake = DispatchSemaphore(value: 0)
    private let idle = NSCondition()
    let size: Int

    init(threads: Int, name: String) {
        self.size = max(1, threads)
        for i in 0..<size {
            let t = Thread { [self] in self.loop() }
            t.name = "\(name)-\(i)"
            t.start()
        }
    }

    /// Number of jobs queued or running.
    var pending: Int { state.withLock { $0.pending } }

    func submit(_ job: @escaping Job) {
        state.withLock { $0.queue.append(job) }
        wake.signal()
    }

    /// Waits until every submitted job has run.
    func drain() {
        idle.lock()
        while pending > 0 { _ = idle.wait(until: Date().addingTimeInterval(0.05)) }
        idle.unlock()
    }

    /// Drains, then stops the threads.
    func stop() {
        drain()
        state.withLock { $0.stopping = true }
        for _ in 0..<size { wake.signal() }
    }

    /// Drops the jobs not yet started, then stops the threads once the
    /// running ones finish.
    func abandon() {
        state.withLock { s in
            s.queue.removeAll()
            s.head = 0
        }
        stop()
    }

    private func loop() {
        while true {
            wake.wait()
            let job: Job? = state.withLock { s in
                if s.head < s.queue.count {
                    let j = s.queue[s.head]
                    s.head += 1
                    s.running += 1
                    if s.head > 1024 && s.head * 2 > s.queue.count {
                        s.queue.removeFirst(s.head)
                        s.head = 0
                    }
                    return j
                }
                return nil
            }
            guard let job else {
                if state.withLock({ $0.stopping }) { return }
                continue
            }
            job()
            state.withLock { $0.running -= 1 }
            idle.lock()
            idle.broadcast()
            idle.unlock()
        }
    }
}
