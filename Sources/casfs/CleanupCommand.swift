import ArgumentParser
import CASConfig
import CASCore
import CASStorage
import Foundation

/// BuildGrid's janitor: above the high watermark, delete least recently used
/// blobs down to the low watermark, sparing those accessed recently.
struct CleanupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cleanup",
        abstract: "Delete least recently used blobs when the store is above a size.",
        discussion: """
            SIZE is bytes or a number with K, M, G, T (binary: 1K = 1024), optionally
            followed by B or iB. DUR is seconds or a number with s, m, h, d.
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
        do {
            let stack = try OpenStack(configPath: config)
            defer { stack.close() }
            let index = try stack.redisIndex(for: "cleanup")
            repeat {
                try once(index, p)
                if let w = p.watch { Thread.sleep(forTimeInterval: w) }
            } while p.watch != nil
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
        let want = total - p.low
        let deleted = try index.deleteNBytes(
            want, dryRun: dryRun,
            protectBlobsAfter: now.addingTimeInterval(-p.protect),
            largeBlobThreshold: p.largeThreshold,
            largeBlobLifetime: p.largeLifetime.map { now.addingTimeInterval(-$0) },
            onDelete: { print("\(dryRun ? "would delete" : "deleted") sha256/\($0)") })
        let verb = dryRun ? "would delete" : "deleted"
        print("total size \(humanBytes(total)) (\(total) bytes) is above \(humanBytes(p.high)): \(verb) \(humanBytes(deleted)) (\(deleted) bytes) of the \(humanBytes(want)) asked")
        if !dryRun { print("total size now \(humanBytes(try index.totalSize())) (\(try index.totalSize()) bytes)") }
    }
}
