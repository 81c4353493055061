import CASCore
import CASStorage
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// Watches a mount's index for loss: a Redis restarted empty or one that
/// evicts keys leaves blobs on disk that the index no longer knows (`ls`
/// and `df` miss them, cleanup cannot free them). Each check looks at the
/// eviction policy, `total_size` and a random sample of the store; a problem
/// is logged once when it appears (and once when it is gone), shown as the
/// gauge `casfs_index_problem{kind}`, counted, and a lost index is repaired
/// by a background reindex.
public final class IndexHealthMonitor: Sendable {
    private let index: RedisIndex
    private let name: String
    private let reindex: BackgroundReindex?
    private let log: Logger
    private let gauges: [Kind: MetricGauge]
    private let detected: MetricCounter
    private struct State {
        var last: IndexHealth?
        var shown: Set<Kind> = []
        var lastRequest: Date?
    }
    private let state = Mutex(State())
    /// A loss that a reindex did not cure is repaired again after this long.
    private let retryAfter: Double

    enum Kind: String, CaseIterable {
        case emptierThanStore = "emptier_than_store"
        case totalSizeMissing = "total_size_missing"
        case evictingPolicy = "evicting_policy"
    }

    public init(index: RedisIndex, name: String, metrics: Metrics, reindex: BackgroundReindex?, log: Logger,
                retryAfter: Double = 600) {
        self.index = index
        self.name = name
        self.reindex = reindex
        self.log = log
        self.retryAfter = retryAfter
        var g: [Kind: MetricGauge] = [:]
        for k in Kind.allCases {
            let gauge = metrics.gauge(MetricCatalog.indexProblem, [("kind", k.rawValue)])
            gauge.set(Int64(0))
            g[k] = gauge
        }
        gauges = g
        detected = metrics.counter(MetricCatalog.indexLossDetected)
    }

    /// What the last check found.
    public var last: IndexHealth? { state.withLock { $0.last } }

    /// Checks once: logs what changed, sets the gauges, asks for a reindex
    /// when entries were lost. A Redis that does not answer is not a loss
    /// (its errors are logged where they happen).
    @discardableResult
    public func check() -> IndexHealth? {
        let health: IndexHealth
        do { health = try index.checkHealth() } catch {
            log.debug("index check of \(name) skipped: \(error)")
            return nil
        }
        var now: Set<Kind> = []
        if health.emptierThanStore { now.insert(.emptierThanStore) }
        if health.totalSizeMissing { now.insert(.totalSizeMissing) }
        if health.evicts { now.insert(.evictingPolicy) }
        for (k, g) in gauges { g.set(Int64(now.contains(k) ? 1 : 0)) }
        let (appeared, cleared, repair) = state.withLock { s -> (Set<Kind>, Set<Kind>, Bool) in
            let appeared = now.subtracting(s.shown)
            let cleared = s.shown.subtracting(now)
            s.shown = now
            s.last = health
            var repair = false
            if health.lost, let reindex, !reindex.isBusy {
                let due = s.lastRequest.map { Date().timeIntervalSince($0) >= retryAfter } ?? true
                if due || !appeared.intersection([.emptierThanStore, .totalSizeMissing]).isEmpty {
                    s.lastRequest = Date()
                    repair = true
                }
            }
            if !health.lost { s.lastRequest = nil }
            return (appeared, cleared, repair)
        }
        if !appeared.intersection([.emptierThanStore, .totalSizeMissing]).isEmpty { detected.add(1) }
        for line in health.problems where appeared.contains(where: { line.contains(Self.marker($0)) }) {
            log.error("index of \(name): \(line)\(health.lost && reindex != nil ? "; reindexing in the background" : "")")
        }
        if !cleared.isEmpty && now.isEmpty {
            log.notice("index of \(name): it agrees with its store again")
        }
        if repair { reindex?.request() }
        return health
    }

    /// Words of `IndexHealth.problems` that tell which kind a line is.
    private static func marker(_ k: Kind) -> String {
        switch k {
        case .emptierThanStore: "much emptier"
        case .totalSizeMissing: "total_size"
        case .evictingPolicy: "maxmemory-policy"
        }
    }
}

/// `IndexHealthMonitor` as a service: a check at start and every `interval`
/// seconds until shutdown.
public struct IndexHealthService: Service {
    public let monitor: IndexHealthMonitor
    public let interval: Double

    public init(_ monitor: IndexHealthMonitor, interval: Double = 10) {
        self.monitor = monitor
        self.interval = interval
    }

    public func run() async throws {
        try await PeriodicService(interval: interval) { [monitor] in monitor.check() }.run()
    }
}
