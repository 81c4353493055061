import ArgumentParser
import CASConfig
import CASCore
import CASDaemon
import CASStorage
import CLinux
import Foundation

struct StatCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stat",
        abstract: "Show the store's total size and blob count (and a mount's live counters).",
        discussion: """
            The blob count is the number of index keys under the configured prefix
            (other prefixes and other keys in a shared Redis are not counted); the
            total size is the index's total_size counter. With --mount, the live
            counters of that mount (the same numbers its metrics endpoint serves)
            are shown too; a configuration without an index then shows only those,
            and so does --mount without --config unless it names the zero-config mount.
            """)

    @Option(name: .long, help: "YAML config; without it, the zero-config default store.")
    var config: String?

    @Option(name: .long, help: "A casfs mount point whose live counters (cache hits, fetches, queued writes) to show.")
    var mount: String?

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    func run() throws {
        var store: [String: Int64] = [:]
        var live: [String: Double] = [:]
        do {
            if let mount { live = try liveCounters(mount) }
            if opensStore {
                let stack = try OpenStack(configPath: config)
                defer { stack.close() }
                if let index = stack.index {
                    store["total_size"] = try index.totalSize()
                    store["blob_count"] = try index.blobCount()
                } else if mount == nil {
                    throw CLIError("stat needs a !redis-index in the configuration (or --mount to show a mount's counters)")
                }
            }
        } catch {
            printError(error)
            throw ExitCode.failure
        }
        if json {
            var out: [String: Any] = store
            if !live.isEmpty { out["mount"] = live }
            let data = try JSONSerialization.data(withJSONObject: out, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        if let n = store["blob_count"], let t = store["total_size"] {
            print("blobs:       \(n)")
            print("total size:  \(humanBytes(max(0, t))) (\(t) bytes)\(t < 0 ? " — negative: run `casfs reindex`" : "")")
        }
        guard !live.isEmpty else { return }
        func sum(_ m: MetricInfo) -> Int64 {
            // Numbers read from an xattr: clamp rather than trap on a huge or odd value.
            let total = live.filter { $0.key == m.name || $0.key.hasPrefix(m.name + "{") }.values.reduce(0, +)
            guard total.isFinite else { return total > 0 ? .max : 0 }
            return total >= 9.2e18 ? .max : total <= -9.2e18 ? .min : Int64(total)
        }
        let hits = sum(MetricCatalog.cacheHits), misses = sum(MetricCatalog.cacheMisses)
        let lookups = hits.saturatingAdd(misses)
        let rate = lookups > 0 ? 100 * Double(hits) / Double(lookups) : 0
        print(String(format: "cache:       %lld hits, %lld misses (%.1f%% hit rate), %lld fallback fetches",
                     hits, misses, rate, sum(MetricCatalog.fallbackFetches)))
        if sum(MetricCatalog.memoryMaxBytes) > 0 {
            print("memory:      \(humanBytes(sum(MetricCatalog.memoryBytes))) of \(humanBytes(sum(MetricCatalog.memoryMaxBytes)))")
        }
        print("reads:       \(humanBytes(sum(MetricCatalog.readBytes))) served, \(sum(MetricCatalog.verifyFailures)) verification failures")
        let queued = sum(MetricCatalog.deferredQueued)
        if live.keys.contains(where: { $0.hasPrefix(MetricCatalog.deferredQueued.name) }) {
            let age = live.first { $0.key.hasPrefix(MetricCatalog.deferredOldestAge.name) }?.value ?? 0
            print(String(format: "deferred:    %lld writes queued, oldest %.0f s", queued, age))
        }
        if sum(MetricCatalog.treeLoads) > 0 {
            print("trees:       \(sum(MetricCatalog.treeCached)) Directory messages cached, \(sum(MetricCatalog.treeHits)) hits, \(sum(MetricCatalog.treeLoads)) loads")
        }
    }

    /// Whether the store's totals are shown too: always with --config or
    /// without --mount; with only --mount, when it is the zero-config mount
    /// (another mount's store is not the zero-config one, which is then
    /// neither created nor started).
    private var opensStore: Bool {
        guard config == nil, let mount else { return true }
        let serving = OpenStack.runningZeroConfigMount(dataDirectory: DefaultConfig.dataDirectory())
        return serving.map { absolute($0) == absolute(mount) } ?? false
    }

    /// The counters a running mount publishes in its root's `user.casfs.stats` attribute.
    private func liveCounters(_ mount: String) throws -> [String: Double] {
        let name = "user.casfs.stats"
        let size = getxattr(mount, name, nil, 0)
        guard size > 0 else { throw CLIError("\(mount) is not a casfs mount (no \(name) attribute)") }
        var buf = [UInt8](repeating: 0, count: size + 65536)
        let n = getxattr(mount, name, &buf, buf.count)
        guard n > 0, let obj = try? JSONSerialization.jsonObject(with: Data(buf[0..<n])) as? [String: Any] else {
            throw CLIError("cannot read \(name) of \(mount)")
        }
        return obj.compactMapValues { ($0 as? NSNumber)?.doubleValue }
    }
}
