import Foundation
import TestSupport
import XCTest

/// A `casfs worker` process started the way a user starts it, with its log
/// in its cache directory's parent and its metrics on a free port.
final class WorkerProcess: @unchecked Sendable {
    let cacheDir: String
    let logPath: String
    let metricsPort: Int
    private(set) var process: Process?

    init(server: String, instance: String, directory: String, jobs: Int = 2, extra: [String] = []) throws {
        cacheDir = directory + "/cache"
        logPath = directory + "/worker.log"
        metricsPort = try RedisServer.freePort()
        let args = ["worker", "--server", server, "--instance-name", instance, "--jobs", String(jobs),
                    "--cache-dir", cacheDir, "--metrics", "127.0.0.1:\(metricsPort)"] + extra
        let p = try startLoggedProcess(try casfsBinary(), args, log: logPath)
        process = p
        guard pollUntil(60, { !p.isRunning || self.log().contains("bot session") && self.log().contains("created") }), p.isRunning else {
            let text = log()
            stop()
            throw TestSupportError("casfs worker did not start a bot session; log:\n\(text.suffix(4000))")
        }
    }

    deinit { stop() }

    func log() -> String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    var isRunning: Bool { process?.isRunning ?? false }

    /// SIGTERM, and waits up to `seconds` for the worker to exit (then
    /// SIGKILL). Returns its exit status.
    @discardableResult
    func stop(seconds: Double = 90) -> Int32? {
        guard let p = process else { return nil }
        process = nil
        if p.isRunning {
            kill(p.processIdentifier, SIGTERM)
            if !pollUntil(seconds, { !p.isRunning }) { kill(p.processIdentifier, SIGKILL) }
        }
        p.waitUntilExit()
        // A worker killed outright leaves its mounts: clear them.
        _ = runShell("grep -o ' \(cacheDir)[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null")
        return p.terminationStatus
    }

    func signal(_ sig: Int32) {
        if let p = process, p.isRunning { kill(p.processIdentifier, sig) }
    }

    /// The metrics page, as `name{labels} value` lines.
    func metricsText() throws -> String {
        let r = runShell("curl -sf http://127.0.0.1:\(metricsPort)/metrics")
        guard r.ok else { throw TestSupportError("GET /metrics failed: \(r)") }
        return r.stdout
    }

    /// The sum of a metric's samples whose labels contain `labels` (e.g. `outcome="success"`).
    func metric(_ name: String, _ labels: String = "") throws -> Double {
        var total = 0.0
        for line in try metricsText().split(separator: "\n") where !line.hasPrefix("#") {
            let parts = line.split(separator: " ")
            guard parts.count >= 2 else { continue }
            let key = String(parts[0])
            let bare = key.split(separator: "{").first.map(String.init) ?? key
            guard bare == name, labels.isEmpty || key.contains(labels), let v = Double(parts[1]) else { continue }
            total += v
        }
        return total
    }
}

extension Dictionary where Key == String, Value == Any {
    var status: (code: Int, message: String) {
        let s = self["status"] as? [String: Any] ?? [:]
        return ((s["code"] as? Int) ?? -1, (s["message"] as? String) ?? "")
    }
    var exitCode: Int? { self["exit_code"] as? Int }
    var stdout: String { self["stdout"] as? String ?? "" }
    var stderr: String { self["stderr"] as? String ?? "" }
    var outputFiles: [String: [String: Any]] { self["output_files"] as? [String: [String: Any]] ?? [:] }
    var outputDirectories: [String: [String: Any]] { self["output_directories"] as? [String: [String: Any]] ?? [:] }
    func content(_ path: String) -> String? { outputFiles[path]?["content"] as? String }
}
