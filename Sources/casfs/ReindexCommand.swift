import ArgumentParser
import CASConfig
import CASCore
import CASDaemon
import CASStorage
import Foundation

/// Makes the index and the store agree.
struct ReindexCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reindex",
        abstract: "Reconcile the Redis index with the store it indexes.",
        discussion: """
            Adds the blobs the store holds that the index lacks (for a disk store),
            removes index entries whose bytes are gone, and recomputes total_size
            from the entries. Safe beside running mounts and a BuildGrid sharing the
            store and the Redis. With --dry-run, only reports what it would change.
            """)

    @Option(name: .long, help: "YAML config; without it, the zero-config default store.")
    var config: String?

    @Flag(name: .long, help: "Only report what would change.")
    var dryRun = false

    func run() throws {
        lineBufferStdout()
        do {
            let stack = try OpenStack(configPath: config)
            defer { stack.close() }
            let index = try stack.redisIndex(for: "reindex")
            let r = try index.reconcile(dryRun: dryRun) { print($0) }
            let verb = dryRun ? "would add" : "added"
            print("\(verb) \(r.added) blobs (\(humanBytes(r.addedBytes))) missing from the index")
            print("\(dryRun ? "would drop" : "dropped") \(r.dropped) entries without bytes (\(humanBytes(r.droppedBytes)))")
            if let after = r.totalAfter {
                print("total_size \(r.totalBefore) → \(after) bytes (\(r.blobs) blobs)\(dryRun ? " (not written)" : "")")
            } else {
                print("total_size left at \(r.totalBefore): writers kept changing it; run again when quieter")
            }
        } catch {
            printError(error)
            throw ExitCode.failure
        }
    }
}
