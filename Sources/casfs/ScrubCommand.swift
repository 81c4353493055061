import ArgumentParser
import CASConfig
import CASCore
import CASDaemon
import CASStorage
import CLinux
import Foundation
import Synchronization

/// Re-hashes every object of the disk stores and repairs what is damaged.
struct ScrubCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scrub",
        abstract: "Re-hash every store file and repair or remove the damaged ones.",
        discussion: """
            Reads every object of every !disk-storage in the configuration (from
            the medium, not a cached copy, where the filesystem allows) and checks
            it against its name, at most --rate MiB per second. A damaged object is
            replaced with verified bytes from a storage that has them (the fallback
            of a cache, another replica), else removed from the store and its index.
            Objects are taken in hash order; the position is kept in <store>/scrub.state,
            so a scrub that is stopped (SIGINT, SIGTERM) or killed resumes there.
            Safe beside running mounts, cleanup and a BuildGrid sharing the store.

            Exit status: 0 when nothing was damaged, 1 when something was (repaired
            or not), 2 when the scrub could not run or finish.
            """)

    @Option(name: .long, help: "YAML config; without it (and without --mount), the zero-config default store.")
    var config: String?

    @Option(name: .long, help: "Scrub the stores that this casfs mount serves.")
    var mount: String?

    @Option(name: .long, help: ArgumentHelp("Read at most this many MiB per second (or a size per second: 200M); 0: no bound.", valueName: "MB/s"))
    var rate = "50"

    @Flag(name: .long, help: "Only report damaged objects; change nothing (and start from the beginning).")
    var dryRun = false

    @Flag(name: .long, help: "Never show a progress bar.")
    var quiet = false

    func run() throws {
        guard let bytesPerSecond = parseRate(rate) else {
            printError("--rate: '\(rate)' is not a rate (MiB per second, or a size per second such as 200M)")
            throw ExitCode(2)
        }
        if config != nil && mount != nil {
            printError("give --config or --mount, not both")
            throw ExitCode(2)
        }
        lineBufferStdout()
        let stop = ScrubStop()
        let outcome: ScrubOutcome
        do {
            // SIGINT and SIGTERM stop the pass after the file being read; its cursor is kept.
            outcome = try runBlocking {
                try await Daemon.withSignals([.sigterm, .sigint], onSignal: { _ in stop.set() }) {
                    try self.scrub(rate: bytesPerSecond, stop: stop)
                }
            }
        } catch {
            printError(error)
            throw ExitCode(2)
        }
        switch outcome {
        case .clean: return
        case .damaged: throw ExitCode(1)
        case .stopped: throw ExitCode(2)
        }
    }

    enum ScrubOutcome: Sendable { case clean, damaged, stopped }

    private func scrub(rate bytesPerSecond: Int64, stop: ScrubStop) throws -> ScrubOutcome {
        var configPath = config
        if let mount { configPath = try ScrubCommand.configOfMount(mount) }
        let stack = try OpenStack(configPath: configPath)
        defer { stack.close() }
        let targets = stack.stack.scrubTargets
        guard !targets.isEmpty else { throw CLIError("the configuration has no !disk-storage to scrub") }
        var damaged: Int64 = 0
        for t in targets {
            let bar = ScrubBar(enabled: !quiet && isatty(2) != 0, name: t.name)
            let scrubber = Scrubber(t, rate: bytesPerSecond, dryRun: dryRun,
                                    metrics: MetricScope(stack.metrics, node: t.name),
                                    shouldStop: { stop.isSet })
            let mount = self.mount
            let s = try scrubber.run(report: { f in
                bar.clear()
                print("damaged: sha256/\(f.digest) in \(t.name) (\(t.disk.root)): \(f.problem); \(Scrubber.describe(f.repair))")
                if let mount, f.repair != .leftAlone { ScrubCommand.dropCachedPages(mount, f.digest) }
            }, progress: { bar.update($0) })
            bar.clear()
            damaged += s.damaged
            let resumed = s.resumedAfter.map { " (resumed after \($0.prefix(12))…)" } ?? ""
            var line = "\(t.name) (\(t.disk.root)): \(s.objects) files checked (\(humanBytes(s.bytes)))\(resumed), \(s.damaged) damaged"
            if s.damaged > 0 && !dryRun { line += ": \(s.repaired) repaired, \(s.removed) removed" }
            if s.skipped > 0 { line += "; \(s.skipped) changed or removed while checked, left to the next pass" }
            print(line)
            guard s.complete else {
                print("stopped; the next scrub resumes where this one stopped")
                return damaged > 0 ? .damaged : .stopped
            }
        }
        return damaged > 0 ? .damaged : .clean
    }

    /// The configuration file of the casfs mount at `path`; nil for the
    /// zero-config mount of this data directory.
    static func configOfMount(_ path: String) throws -> String? {
        guard MountTable.isCasfsMount(path) else { throw CLIError("\(path) is not a casfs mount") }
        let name = "user.casfs.config"
        var buf = [UInt8](repeating: 0, count: 4097)
        let n = getxattr(path, name, &buf, buf.count)
        if n > 0 { return String(decoding: buf[0..<n], as: UTF8.self) }
        if let zero = OpenStack.runningZeroConfigMount(dataDirectory: DefaultConfig.dataDirectory()),
           absolute(zero) == absolute(path) {
            return nil
        }
        throw CLIError("\(path) is a casfs mount without a configuration file that is not the zero-config mount of \(DefaultConfig.dataDirectory()); give --config")
    }

    /// Drops the pages of `digest`'s file that the kernel of `mount` holds
    /// (they may be the damaged bytes).
    static func dropCachedPages(_ mount: String, _ digest: Digest) {
        let fd = open("\(mount)/sha256/\(digest)", O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { return }
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        close(fd)
    }
}

/// Set by SIGINT or SIGTERM.
final class ScrubStop: Sendable {
    private let flag = Atomic<Bool>(false)
    func set() { flag.store(true, ordering: .relaxed) }
    var isSet: Bool { flag.load(ordering: .relaxed) }
}

/// One line on stderr: how far the scrub of a store is.
final class ScrubBar: @unchecked Sendable {
    let enabled: Bool
    let name: String
    private var lastDraw = Date.distantPast
    private let start = Date()
    private var drawn = false

    init(enabled: Bool, name: String) {
        self.enabled = enabled
        self.name = name
    }

    func update(_ p: ScrubProgress) {
        guard enabled else { return }
        let now = Date()
        guard now.timeIntervalSince(lastDraw) >= 0.1 else { return }
        lastDraw = now
        let width = 30
        let filled = max(0, min(width, Int(p.fraction * Double(width))))
        let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
        let line = String(format: "\r[%@] %3d%% %@: %lld files, %@ checked, %lld damaged", bar, Int(p.fraction * 100), name,
                          p.objects, humanBytes(p.bytes), p.damaged)
        FileHandle.standardError.write(Data(line.utf8))
        drawn = true
    }

    func clear() {
        guard enabled, drawn else { return }
        FileHandle.standardError.write(Data("\r\u{1b}[K".utf8))
        drawn = false
    }
}
