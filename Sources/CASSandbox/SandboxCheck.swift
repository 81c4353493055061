import CASProcess
import Foundation

/// Fail closed: before the command runs, the same sandbox runs
/// `cat /proc/self/status`. If bwrap cannot build it (namespaces it may not
/// create, a path it cannot bind, a bwrap too old for an option), its
/// message becomes one line of casfs run's; if the process inside would
/// keep any capability or lack no_new_privs, the command is not run.
public enum SandboxCheck {
    /// The capability sets of /proc/<pid>/status, all of which must be empty.
    public static let capabilitySets = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]

    /// Runs the check; `arguments` are bwrap's up to `--`. Returns the pid
    /// to `started` so that a signal can be passed on.
    static func run(bwrap: String, arguments: [String], started: (pid_t) -> Void) throws {
        let candidates = ["/usr/bin/cat", "/bin/cat"]
        guard let cat = candidates.first(where: { access($0, X_OK) == 0 }) else {
            throw SandboxError("cannot check the sandbox: no cat in /usr/bin or /bin")
        }
        let pipe = try ChildOutputPipe()
        let pid: pid_t
        switch Spawn.start(bwrap, [bwrap] + arguments + ["--", cat, "/proc/self/status"], stdin: .null,
                           stdout: .descriptor(pipe.writeEnd), stderr: .descriptor(pipe.writeEnd), processGroup: true) {
        case .success(let p): pid = p
        case .failure(let e): throw SandboxError("\(e)")
        }
        pipe.closeWriteEnd()
        started(pid)
        let output = String(decoding: pipe.readAll(), as: UTF8.self)
        let end = Spawn.waitForTermination(pid)
        guard end == .exited(0) else {
            let said = output.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
                .filter { !$0.isEmpty }.joined(separator: "; ")
            let how = end.map { $0 == .exited(1) ? "" : " (bwrap ended with status \($0.status))" } ?? ""
            throw SandboxError("cannot set up the sandbox\(how): \(said.isEmpty ? "bwrap said nothing" : said)")
        }
        let left = privilegesLeft(status: output)
        guard left.isEmpty else {
            throw SandboxError("the sandbox would keep privileges (\(left.joined(separator: ", "))): not running the command")
        }
    }

    /// What a /proc/<pid>/status text shows of privileges: every capability
    /// set that is not empty or cannot be read, and NoNewPrivs unless it is 1.
    public static func privilegesLeft(status: String) -> [String] {
        var fields: [String: String] = [:]
        for line in status.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var left: [String] = []
        for set in capabilitySets {
            let value = fields[set] ?? "missing"
            if UInt64(value, radix: 16) != 0 { left.append("\(set)=\(value)") }
        }
        let nnp = fields["NoNewPrivs"] ?? "missing"
        if nnp != "1" { left.append("NoNewPrivs=\(nnp)") }
        return left
    }
}
