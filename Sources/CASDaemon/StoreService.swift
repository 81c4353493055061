import CASConfig
import Foundation
import Logging
import ServiceLifecycle

/// A mount's storage stack as a service, stopped once everything above it
/// has stopped: the storage (deferred writes drained, access times
/// flushed), then the private Redis the stack owns, then the mount lock. A
/// zero-config stack's private Redis is watched meanwhile (and started
/// again if it dies; `restarted` runs after each restart).
public struct StoreService: Service {
    public let stack: OpenStack
    private let log: Logger
    private let restarted: @Sendable () -> Void

    public init(_ stack: OpenStack, log: Logger, restarted: @escaping @Sendable () -> Void = {}) {
        self.stack = stack
        self.log = log
        self.restarted = restarted
    }

    public func run() async throws {
        let watchdog = stack.privateRedis.map { PrivateRedisWatchdog.start($0, log: log, restarted: restarted) }
        await untilShutdown { [stack] in
            // Stopped first, so that the Redis that close() stops is not started again.
            watchdog?.stop()
            stack.withdrawMountPoint()
            stack.close()
        }
    }
}
