import ArgumentParser
import Foundation

/// The `casfs` command. Each subcommand lives in its own file.
struct Casfs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "casfs",
        abstract: "Mount a content-addressable store (Bazel REAPI CAS) as a filesystem.",
        version: casfsVersion,
        subcommands: [MountCommand.self, PutCommand.self, StatCommand.self, CleanupCommand.self,
                      ReindexCommand.self, RunCommand.self, WorkerCommand.self])
}

/// The version `casfs --version` prints.
let casfsVersion = "0.5.0"

/// Entry point, called from main.swift; nonisolated so that nothing here is
/// tied to the main actor while FUSE threads run.
func runCasfs() {
    Casfs.main()
}
