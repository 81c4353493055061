import ArgumentParser
import CASConfig
import CASCore
import CASDaemon
import CASStorage
import Foundation
import Logging

/// BuildGrid's janitor, least recently used first: above the high watermark,
/// delete blobs down to the low watermark, sparing those accessed recently.
struct CleanupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cleanup",
        abstract: "Delete the least recently used blobs when the store is above a size.",
        discussion: """
            Above --high-watermark, deletes blobs down to --low-watermark, least
            recently used first: the index is walked once (a blob's last access is
            read from its key's TTL, which casfs and BuildGrid refresh on use) and
            only the oldest blobs that cover the bytes to free are kept in memory.
            A blob read or written while cleanup runs is not deleted. --scan-order
            deletes in Redis SCAN order instead, as BuildGrid's `bgd cleanup` does
            with a Redis index.

            SIZE is bytes or a number with K, M, G, T (binary: 1K = 1024), optionally
            followed by B or iB. DUR is seconds or a number with s, m, h, d.
            Output is line-buffered; with --watch, SIGTERM or SIGINT ends the run
            after the current pass.
            """)

    @Option(name: .long, help: "YAML config; without it, the zero-config default store.")
    var config: String?

    @Option(name: .long, help: ArgumentHelp("Clean up when the total size is above this.", valueName: "SIZE"))
    var highWatermark: String

    @Option(name: .long, help: ArgumentHelp("Delete down to this total size.", valueName: "SIZE"))
    var lowWatermark: String

    @Option(name: .long, help: ArgumentHelp("Never delete blobs accessed within this long (default 0).", valueName: "DUR"))
    var protectAfter: String?

    @Option(name: .long, help: ArgumentHelp("Blobs larger than this...", valueName: "SIZE"))
    var largeBlobThreshold: String?

    @Option(name: .long, help: ArgumentHelp("...are deleted once not accessed for this long.", valueName: "DUR"))
    var largeBlobLifetime: String?

    @Flag(name: .long, help: "Delete in Redis SCAN order, as BuildGrid does, instead of least recently used first.")
    var scanOrder = false

    @Flag(name: .long, help: "Only report what would be deleted.")
    var dryRun = false

    @Option(name: .long, help: ArgumentHelp("Keep running, checking every DUR.", valueName: "DUR"))
    var watch: String?

    struct Plan {
        var high: Int64
        var low: Int64
        var protect: Double
        var largeThreshold: Int64?
        var largeLifetime: Double?
        var watch: Double?
    }

    func plan() throws -> Plan {
        func size(_ text: String, _ flag: String) throws -> Int64 {
            guard let v = parseByteSize(text) else {
                throw CLIError("--\(flag): '\(text)' is not a size (bytes, or a number with K, M, G, T)")
            }
            return v
        }
        func duration(_ text: String, _ flag: String) throws -> Double {
            guard let v = parseDuration(text) else {
                throw CLIError("--\(flag): '\(text)' is not a duration (seconds, or 90s, 15m, 2h, 7d)")
            }
            return v
        }
        var p = Plan(high: try size(highWatermark, "high-watermark"), low: try size(lowWatermark, "low-watermark"),
                     protect: try protectAfter.map { try duration($0, "protect-after") } ?? 0)
        guard p.low <= p.high else {
            throw CLIError("--low-watermark (\(lowWatermark)) must not be above --high-watermark (\(highWatermark))")
        }
        guard (largeBlobThreshold == nil) == (largeBlobLifetime == nil) else {
            throw CLIError("--large-blob-threshold and --large-blob-lifetime go together")
        }
        p.largeThreshold = try largeBlobThreshold.map { try size($0, "large-blob-threshold") }
        p.largeLifetime = try largeBlobLifetime.map { try duration($0, "large-blob-lifetime") }
        p.watch = try watch.map { try duration($0, "watch") }
        if let w = p.watch, w <= 0 { throw CLIError("--watch must be positive") }
        return p
    }

    func run() throws {
        let p: Plan
        do { p = try plan() } catch {
            printError(error)
            throw ExitCode(2)
        }
        // Each line reaches a pipe or log as it is printed.
        lineBufferStdout()
        do {
            let stack = try OpenStack(configPath: config)
            defer { stack.close() }
            let index = try stack.redisIndex(for: "cleanup")
            if let w = p.watch {
                // A pass every DUR until SIGTERM or SIGINT, which end the run after the current pass.
                let pass = PeriodicService(interval: w) { [self] in try once(index, p) }
                try runBlocking {
                    try await Daemon.group([Daemon.essential(pass, name: "cleanup")], log: Logger(label: "casfs.cleanup"),
                                           signals: [.sigterm, .sigint]).run()
                }
            } else {
                try once(index, p)
            }
        } catch {
            printError(error)
            throw ExitCode.failure
        }
    }

    private func once(_ index: RedisIndex, _ p: Plan) throws {
        let total = try index.totalSize()
        guard total > p.high else {
            print("total size \(humanBytes(total)) (\(total) bytes) is not above the high watermark \(humanBytes(p.high)); nothing to do")
            return
        }
        let now = Date()
        let want = total.saturatingSubtract(p.low)
        let rules = CleanupRules(protectBlobsAfter: now.addingTimeInterval(-p.protect),
                                 largeBlobThreshold: p.largeThreshold,
                                 largeBlobLifetime: p.largeLifetime.map { now.addingTimeInterval(-$0) })
        let verb = dryRun ? "would delete" : "deleted"
        let deleted = try index.deleteNBytes(want, order: scanOrder ? .scan : .leastRecentlyUsed, dryRun: dryRun, rules: rules) {
            print("\(verb) sha256/\($0)")
        }
        print("total size \(humanBytes(total)) (\(total) bytes) is above \(humanBytes(p.high)): \(verb) \(humanBytes(deleted)) (\(deleted) bytes) of the \(humanBytes(want)) asked")
        if !dryRun {
            let now = try index.totalSize()
            print("total size now \(humanBytes(max(0, now))) (\(now) bytes)\(now < 0 ? "; the counter is below zero: run `casfs reindex`" : "")")
        }
    }
}
