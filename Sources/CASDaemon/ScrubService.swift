import CASConfig
import CASCore
import CASFuse
import CASStorage
import Foundation
import ServiceLifecycle

/// The background scrub of a mount's disk stores (`scrub-interval`,
/// `scrub-rate`) as a service: `BackgroundScrub` runs from start to
/// shutdown, which stops the pass under way (its cursor is kept for the
/// next mount). A repaired blob's cached pages are dropped from the kernel.
public struct ScrubService: Service {
    let stack: StorageStack
    let interval: Double
    let rate: Int64
    let fileSystem: CASFileSystem?

    public init(stack: StorageStack, interval: Double, rate: Int64, fileSystem: CASFileSystem?) {
        self.stack = stack
        self.interval = interval
        self.rate = rate
        self.fileSystem = fileSystem
    }

    public func run() async throws {
        let fs = fileSystem
        let existence = stack.storage.layer(ExistenceCachingStorage.self)
        let scrub = BackgroundScrub.start(stack.scrubTargets, interval: interval, rate: rate, metrics: stack.metrics) { d in
            existence?.forget([d])
            fs?.blobChanged(d)
        }
        await untilShutdown { scrub?.stop() }
    }
}
