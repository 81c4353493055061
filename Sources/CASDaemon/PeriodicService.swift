import Foundation
import ServiceLifecycle
import Synchronization

/// Runs `pass` at once and then every `interval` seconds, on a thread of
/// its own, until graceful shutdown, which lets a running pass finish. A
/// pass that throws ends the service with that error.
public struct PeriodicService: Service {
    public let interval: Double
    private let pass: @Sendable () throws -> Void

    public init(interval: Double, pass: @escaping @Sendable () throws -> Void) {
        self.interval = interval
        self.pass = pass
    }

    public func run() async throws {
        let stop = Stopper()
        try await withTaskCancellationOrGracefulShutdownHandler {
            try await runOnThread(name: "casfs-periodic") { [interval, pass] in
                while !stop.isStopped {
                    try pass()
                    stop.sleep(interval)
                }
            }
        } onCancelOrGracefulShutdown: {
            stop.stop()
        }
    }
}

/// A flag with a wakeable sleep.
final class Stopper: Sendable {
    private let stopped = Mutex(false)
    private let wake = DispatchSemaphore(value: 0)

    var isStopped: Bool { stopped.withLock { $0 } }

    func stop() {
        let first = stopped.withLock { s -> Bool in
            defer { s = true }
            return !s
        }
        if first { wake.signal() }
    }

    /// Sleeps up to `seconds`, waking early once stopped.
    func sleep(_ seconds: Double) {
        if isStopped { return }
        if wake.wait(timeout: .now() + seconds) == .success { wake.signal() }
    }
}
