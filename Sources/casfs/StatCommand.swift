import ArgumentParser
import CASConfig
import CASCore
import CASStorage
import CFuse
import Foundation

struct StatCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stat",
        abstract: "Show the store's total size and blob count (and a mount's cache counters).")

    @Option(name: .long, help: "YAML config; without it, the zero-config default store.")
    var config: String?

    @Option(name: .long, help: "A casfs mount point whose live counters (cache hits, fetches) to show.")
    var mount: String?

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    func run() throws {
        var out: [String: Int64] = [:]
        do {
            let stack = try OpenStack(configPath: config)
            defer { stack.close() }
            guard let index = stack.config.index else {
                throw CLIError("stat needs a !redis-index in the configuration")
            }
            out["total_size"] = try index.totalSize()
            out["blob_count"] = try index.blobCount()
            if let mount { out.merge(try liveCounters(mount)) { a, _ in a } }
        } catch {
            printError(error)
            throw ExitCode.failure
        }
        if json {
            let data = try JSONSerialization.data(withJSONObject: out, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        print("blobs:       \(out["blob_count"] ?? 0)")
        print("total size:  \(humanBytes(out["total_size"] ?? 0)) (\(out["total_size"] ?? 0) bytes)")
        if let hits = out["cache_hits"], let misses = out["cache_misses"] {
            let rate = hits + misses > 0 ? 100 * Double(hits) / Double(hits + misses) : 0
            print(String(format: "cache:       %lld hits, %lld misses (%.1f%% hit rate), %lld fallback fetches",
                         hits, misses, rate, out["fallback_fetches"] ?? 0))
        }
        if let bytes = out["memory_bytes"], let max = out["memory_max_bytes"] {
            print("memory:      \(humanBytes(bytes)) of \(humanBytes(max))")
        }
        if let cached = out["tree_directories_cached"] {
            print("trees:       \(cached) Directory messages cached, \(out["tree_directory_hits"] ?? 0) hits, \(out["tree_directory_loads"] ?? 0) loads")
        }
    }

    /// The counters a running mount publishes in its root's `user.casfs.stats` attribute.
    private func liveCounters(_ mount: String) throws -> [String: Int64] {
        let name = "user.casfs.stats"
        let size = getxattr(mount, name, nil, 0)
        guard size > 0 else { throw CLIError("\(mount) is not a casfs mount (no \(name) attribute)") }
        var buf = [UInt8](repeating: 0, count: size + 4096)
        let n = getxattr(mount, name, &buf, buf.count)
        guard n > 0, let obj = try? JSONSerialization.jsonObject(with: Data(buf[0..<n])) as? [String: Any] else {
            throw CLIError("cannot read \(name) of \(mount)")
        }
        return obj.compactMapValues { ($0 as? NSNumber)?.int64Value }
    }
}
