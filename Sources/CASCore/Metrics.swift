import Foundation
import Prometheus
import Synchronization

/// One metric casfs exports: its Prometheus name and help text. Every metric
/// is declared once, in `MetricCatalog`, so a name always has one meaning.
public struct MetricInfo: Sendable {
    public let name: String
    public let help: String
    public init(_ name: String, _ help: String) {
        self.name = name
        self.help = help
    }
}

/// The metrics of one process (a mount, a command), kept in a Prometheus
/// registry. `casfs stat --mount`, the mount root's stats attribute and
/// `GET /metrics` all read these same numbers.
public final class Metrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    private let collectors = Mutex<[@Sendable () -> Void]>([])

    public init() {}

    public func counter(_ m: MetricInfo, _ labels: [(String, String)] = []) -> MetricCounter {
        MetricCounter(registry.makeCounter(descriptor: descriptor(m), labels: labels))
    }

    public func gauge(_ m: MetricInfo, _ labels: [(String, String)] = []) -> MetricGauge {
        MetricGauge(registry.makeGauge(descriptor: descriptor(m), labels: labels))
    }

    public func histogram(_ m: MetricInfo, _ labels: [(String, String)] = [], buckets: [Duration]) -> MetricHistogram {
        MetricHistogram(registry.makeDurationHistogram(descriptor: descriptor(m), labels: labels, buckets: buckets))
    }

    private func descriptor(_ m: MetricInfo) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: m.name, helpText: m.help)
    }

    /// `body` runs before every export, to set gauges that are read rather
    /// than counted (queue lengths, cache sizes).
    public func onCollect(_ body: @escaping @Sendable () -> Void) {
        collectors.withLock { $0.append(body) }
    }

    /// The Prometheus text exposition of every metric, gauges refreshed first.
    public func exposition() -> String {
        for c in collectors.withLock({ $0 }) { c() }
        return registry.emitToString()
    }

    /// Every sample as `name{labels}` (or `name`) → value.
    public func snapshot() -> [String: Double] {
        var out: [String: Double] = [:]
        for line in exposition().split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let v = Double(line[line.index(after: space)...]) else { continue }
            out[String(line[..<space])] = v
        }
        return out
    }

    /// The sum of a metric's samples over all label sets (`labels` narrows
    /// it to samples that carry each of those `key="value"` pairs).
    public func total(_ m: MetricInfo, _ labels: [(String, String)] = []) -> Double {
        total(named: m.name, labels)
    }

    public func total(named name: String, _ labels: [(String, String)] = []) -> Double {
        var sum = 0.0
        for (key, v) in snapshot() {
            let base = key.firstIndex(of: "{").map { String(key[..<$0]) } ?? key
            guard base == name else { continue }
            if labels.allSatisfy({ key.contains("\($0.0)=\"\($0.1)\"") }) { sum += v }
        }
        return sum
    }
}

/// A counter that ignores what cannot count (a negative or zero amount)
/// instead of trapping on it.
public struct MetricCounter: Sendable {
    let counter: Counter
    init(_ c: Counter) { counter = c }
    @inlinable public func add(_ n: Int64 = 1) { if n > 0 { counterIncrement(n) } }
    @inlinable public func add(_ n: Int) { add(Int64(n)) }
    @usableFromInline func counterIncrement(_ n: Int64) { counter.increment(by: n) }
}

public struct MetricHistogram: Sendable {
    let histogram: DurationHistogram
    init(_ h: DurationHistogram) { histogram = h }
    public func record(_ d: Duration) { histogram.record(d) }
}

public struct MetricGauge: Sendable {
    let gauge: Gauge
    init(_ g: Gauge) { gauge = g }
    public func set(_ v: Int64) { gauge.set(to: Double(v)) }
    public func set(_ v: Double) { gauge.set(to: v.isFinite ? v : 0) }
}

/// Where a storage node reports: the process's metrics and the node's name
/// (its place in the configuration, e.g. `storage.fallback`), which labels
/// every sample so two caches never mix their numbers.
public struct MetricScope: Sendable {
    public let metrics: Metrics
    public let node: String

    public init(_ metrics: Metrics, node: String) {
        self.metrics = metrics
        self.node = node
    }

    /// A scope with a registry of its own (tests, tools that export nothing).
    public static func standalone(_ node: String) -> MetricScope { MetricScope(Metrics(), node: node) }

    public var labels: [(String, String)] { [("node", node)] }
    public func counter(_ m: MetricInfo) -> MetricCounter { metrics.counter(m, labels) }
    public func gauge(_ m: MetricInfo) -> MetricGauge { metrics.gauge(m, labels) }
    /// This node's value of a metric.
    public func value(_ m: MetricInfo) -> Double { metrics.total(m, labels) }
    /// A scope for a part of this node (`storage.cache` under `storage`).
    public func child(_ name: String) -> MetricScope { MetricScope(metrics, node: node + "." + name) }
}
