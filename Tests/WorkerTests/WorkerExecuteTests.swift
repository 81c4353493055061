import Foundation
import TestSupport
import XCTest

/// REAPI rules, each checked with a direct Execute call through a real
/// BuildGrid (PostgreSQL scheduler) to a real `casfs worker`. One BuildGrid
/// and one worker serve the whole class.
final class WorkerExecuteTests: XCTestCase {
    nonisolated(unsafe) static var shared: (dir: String, grid: BuildGridExecution, worker: WorkerProcess)?
    nonisolated(unsafe) static var setUpError: Error?

    override class func setUp() {
        super.setUp()
        do {
            try requireFuse()
            let dir = try makeMountTempDir("casfs-worker")
            let grid = try BuildGridExecution(directory: dir + "/bgd")
            let worker = try WorkerProcess(server: grid.url, instance: grid.instance, directory: dir)
            shared = (dir, grid, worker)
        } catch {
            setUpError = error
        }
    }

    override class func tearDown() {
        if let s = shared {
            s.worker.stop()
            s.grid.stop()
            s.grid.postgres.stop()
            try? FileManager.default.removeItem(atPath: s.dir)
        }
        shared = nil
        super.tearDown()
    }

    var grid: BuildGridExecution { Self.shared!.grid }
    var worker: WorkerProcess { Self.shared!.worker }

    override func setUpWithError() throws {
        if let e = Self.setUpError { throw e }
        XCTAssertNotNil(Self.shared)
    }

    /// Runs `spec`; a unique salt keeps results of other tests out of the way.
    func execute(_ spec: [String: Any], file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        var s = spec
        if s["salt"] == nil { s["salt"] = UUID().uuidString }
        let r = try grid.execute(s)
        if r.status.code != 0 || (r.exitCode ?? 0) != 0 {
            print("execute: \(r.status) exit \(r.exitCode ?? -1)\nstderr: \(r.stderr)\nworker log tail:\n\(worker.log().suffix(2000))")
        }
        return r
    }

    func testArgumentsEnvironmentAndWorkingDirectory() throws {
        let r = try execute([
            "files": ["src/input.txt": "data\n", "src/tool.sh": ["content": "#!/bin/sh\necho \"tool $1\"\n", "executable": true]],
            "arguments": ["/bin/sh", "-c", "cat input.txt > out/copy.txt; ./tool.sh \"$1\" > out/deep/er/tool.txt; pwd > out/pwd.txt; echo \"$GREETING\" > out/env.txt; env > out/all-env.txt", "sh", "arg with spaces"],
            "env": ["GREETING": "hello world", "PATH": "/usr/bin:/bin"],
            "working_directory": "src",
            "output_files": ["out/copy.txt", "out/deep/er/tool.txt", "out/pwd.txt", "out/env.txt", "out/all-env.txt"],
        ])
        XCTAssertEqual(r.status.code, 0, r.status.message)
        XCTAssertEqual(r.exitCode, 0, r.stderr)
        XCTAssertEqual(r.content("out/copy.txt"), "data\n")
        XCTAssertEqual(r.content("out/deep/er/tool.txt"), "tool arg with spaces\n")
        XCTAssertEqual(r.content("out/env.txt"), "hello world\n")
        // The working directory is src/ of the exec root.
        XCTAssertTrue(r.content("out/pwd.txt")?.hasSuffix("/src\n") ?? false, r.content("out/pwd.txt") ?? "")
        // Only the Command's variables (and casfs run's own) reach the action.
        let env = r.content("out/all-env.txt") ?? ""
        XCTAssertFalse(env.contains("HOME="), env)
        XCTAssertFalse(env.contains("CASFS_BUILDGRID"), env)
    }

    func testStdoutStderrAndExitCode() throws {
        let r = try execute([
            "files": ["f": "x"],
            "arguments": ["/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        ])
        XCTAssertEqual(r.status.code, 0, "a failing command is a completed action: \(r.status.message)")
        XCTAssertEqual(r.exitCode, 3)
        XCTAssertEqual(r.stdout, "to-stdout\n")
        XCTAssertEqual(r.stderr, "to-stderr\n")
    }

    func testOutputDirectoryIsATree() throws {
        let r = try execute([
            "files": ["a.txt": "A"],
            "arguments": ["/bin/sh", "-c", "mkdir -p gen/d/sub gen/d/empty && cp a.txt gen/d/a && echo x > gen/d/sub/x && printf '#!/bin/sh\\n' > gen/d/run && chmod +x gen/d/run && ln -s a gen/d/link"],
            "output_directories": ["gen/d"],
        ])
        XCTAssertEqual(r.exitCode, 0, r.stderr)
        let d = try XCTUnwrap(r.outputDirectories["gen/d"], "\(r)")
        let files = d["files"] as? [String: [String: Any]] ?? [:]
        XCTAssertEqual(files["a"]?["content"] as? String, "A")
        XCTAssertEqual(files["sub/x"]?["content"] as? String, "x\n")
        XCTAssertEqual(files["run"]?["executable"] as? Bool, true)
        XCTAssertEqual(files["a"]?["executable"] as? Bool, false)
        XCTAssertEqual(d["symlinks"] as? [String: String], ["link": "a"])
        XCTAssertEqual(Set(d["dirs"] as? [String] ?? []), ["sub", "empty"])
    }

    func testOutputSymlinksAreReportedAsSymlinks() throws {
        let r = try execute([
            "files": ["t.txt": "target"],
            "arguments": ["/bin/sh", "-c", "mkdir -p o && ln -s ../t.txt o/file-link && mkdir -p o/realdir && ln -s realdir o/dir-link"],
            "output_files": ["o/file-link"],
            "output_directories": ["o/dir-link"],
        ])
        XCTAssertEqual(r.exitCode, 0, r.stderr)
        XCTAssertEqual(r["output_symlinks"] as? [String: String], ["o/file-link": "../t.txt", "o/dir-link": "realdir"])
        XCTAssertEqual(r["output_file_symlinks"] as? [String: String], ["o/file-link": "../t.txt"])
        XCTAssertEqual(r["output_directory_symlinks"] as? [String: String], ["o/dir-link": "realdir"])
        XCTAssertTrue(r.outputFiles.isEmpty)
    }

    func testOutputPaths() throws {
        let r = try execute([
            "files": ["in": "i"],
            "arguments": ["/bin/sh", "-c", "mkdir -p p/dir && echo f > p/file && echo g > p/dir/g && ln -s file p/link"],
            "output_paths": ["p/file", "p/dir", "p/link", "p/absent"],
        ])
        XCTAssertEqual(r.exitCode, 0, r.stderr)
        XCTAssertEqual(r.content("p/file"), "f\n")
        let files = r.outputDirectories["p/dir"]?["files"] as? [String: [String: Any]]
        XCTAssertEqual(files?["g"]?["content"] as? String, "g\n")
        XCTAssertEqual(r["output_symlinks"] as? [String: String], ["p/link": "file"])
        XCTAssertNil(r.outputFiles["p/absent"])
    }

    func testTimeoutKillsTheProcessGroup() throws {
        let marker = "casfs-timeout-\(UUID().uuidString.prefix(8))"
        let r = try execute([
            "files": ["f": "x"],
            "arguments": ["/bin/sh", "-c", "(exec -a \(marker) sleep 300) & echo started; sleep 300"],
            "timeout": 2,
        ])
        XCTAssertEqual(r.status.code, 4, "DEADLINE_EXCEEDED: \(r.status)")
        XCTAssertTrue(r.status.message.contains("timeout"), r.status.message)
        XCTAssertTrue(pollUntil(10) { !runShell("pgrep -f \(marker)").ok }, "a process of the timed-out action is still running")
        XCTAssertNil(r["action_cache_exit_code"] as? Int, "a timed-out action is not cached")
    }

    func testDoNotCache() throws {
        let cached = try execute(["files": ["f": "1"], "arguments": ["/bin/true"]])
        XCTAssertEqual(cached["action_cache_exit_code"] as? Int, 0, "an ordinary action is in the action cache: \(cached)")
        let uncached = try execute(["files": ["f": "1"], "arguments": ["/bin/true"], "do_not_cache": true])
        XCTAssertEqual(uncached.exitCode, 0)
        XCTAssertNil(uncached["action_cache_exit_code"] as? Int, "do_not_cache: \(uncached)")
    }

    func testMissingInputRootIsALeaseStatusNamingIt() throws {
        let root = String(repeating: "ab", count: 32) + "_123"
        let r = try execute(["input_root": root, "arguments": ["/bin/true"]])
        XCTAssertEqual(r.status.code, 9, "FAILED_PRECONDITION: \(r.status)")
        XCTAssertTrue(r.status.message.contains(root), r.status.message)
    }

    func testAMissingInputFileFailsOnlyWhenRead() throws {
        let r = try execute([
            "files": ["present": "p", "gone": "g"], "missing_input": ["gone"],
            "arguments": ["/bin/sh", "-c", "cat present; ls gone; cat gone"],
        ])
        XCTAssertEqual(r.status.code, 0)
        XCTAssertNotEqual(r.exitCode, 0)
        XCTAssertTrue(r.stdout.hasPrefix("pgone"), r.stdout)
        XCTAssertTrue(r.stderr.contains("Input/output error"), r.stderr)
    }

    func testTheSandbox() throws {
        let r = try execute([
            "files": ["f": "x"],
            "arguments": ["/bin/sh", "-c", """
                grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status
                for p in /root /home /run /var /srv; do [ -e $p ] && echo "visible $p"; done
                cat /etc/shadow >/dev/null 2>&1 && echo "read /etc/shadow"
                touch /usr/casfs-probe 2>/dev/null && echo "wrote /usr"
                tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sed 's/^/if:/'
                touch written-in-exec-root && echo exec-root-writable
                """],
            "env": ["PATH": "/usr/bin:/bin"],
        ])
        XCTAssertEqual(r.exitCode, 0, r.stderr)
        let out = r.stdout
        XCTAssertTrue(out.contains("CapEff:\t0000000000000000"), out)
        XCTAssertTrue(out.contains("CapBnd:\t0000000000000000"), out)
        XCTAssertFalse(out.contains("visible"), out)
        XCTAssertFalse(out.contains("read /etc/shadow"), out)
        XCTAssertFalse(out.contains("wrote /usr"), out)
        XCTAssertEqual(out.split(separator: "\n").filter { $0.hasPrefix("if:") }, ["if:lo"], "no network but loopback: \(out)")
        XCTAssertTrue(out.contains("exec-root-writable"), out)
    }

    /// An input directory that holds an output is writable: the action may
    /// replace an input file there; the CAS keeps the original.
    func testWritingIntoInputDirectoriesStaysOutOfTheCAS() throws {
        let r = try execute([
            "files": ["d/in.txt": "original\n"],
            "arguments": ["/bin/sh", "-c", "rm -f d/in.txt && echo changed > d/in.txt && echo new > d/new.txt && cat d/in.txt"],
            "output_files": ["d/new.txt"],
        ])
        XCTAssertEqual(r.exitCode, 0, r.stderr)
        XCTAssertEqual(r.stdout, "changed\n")
        // The same input root again: the CAS still has the original.
        let again = try execute(["input_root": r["input_root"] as! String, "arguments": ["/bin/cat", "d/in.txt"]])
        XCTAssertEqual(again.stdout, "original\n")
    }

    /// Any input directory is writable, not only the working directory and
    /// the parents of outputs (compilers and tests write temporary files
    /// beside their inputs); the CAS keeps the input root unchanged.
    func testEveryInputDirectoryIsWritable() throws {
        let r = try execute([
            "files": ["a/b/c/in.txt": "original\n", "x/y.txt": "y"],
            "arguments": ["/bin/sh", "-c", "echo tmp > a/b/c/tmp.txt && mkdir a/b/new && rm x/y.txt && echo changed > x/y.txt && cat a/b/c/tmp.txt x/y.txt && stat -c %a a/b/c"],
        ])
        XCTAssertEqual(r.exitCode, 0, r.stderr)
        XCTAssertEqual(r.stdout, "tmp\nchanged\n755\n")
        let again = try execute(["input_root": r["input_root"] as! String,
                                 "arguments": ["/bin/sh", "-c", "ls a/b/c; cat x/y.txt"]])
        XCTAssertEqual(again.exitCode, 0, again.stderr)
        XCTAssertEqual(again.stdout, "in.txt\ny")
    }

    func testAFileNeverOpenedIsNeverFetched() throws {
        let big = 48 << 20
        let before = try worker.metric("casfs_fallback_fetch_bytes_total")
        let r = try execute([
            "files": ["big.bin": ["size": big, "seed": Int.random(in: 1...1_000_000)], "small.txt": "s"],
            "arguments": ["/bin/sh", "-c", "stat -c %s big.bin; ls -l; cat small.txt"],
        ])
        XCTAssertEqual(r.exitCode, 0, r.stderr)
        XCTAssertTrue(r.stdout.hasPrefix("\(big)\n"), r.stdout)
        let fetched = try worker.metric("casfs_fallback_fetch_bytes_total") - before
        XCTAssertLessThan(fetched, Double(big), "the worker fetched \(fetched) bytes for an action that only stat'ed the big file")
        XCTAssertGreaterThan(fetched, 0)
    }

    func testExecutedActionMetadataAndMetrics() throws {
        let before = try worker.metric("casfs_worker_actions_total", "outcome=\"success\"")
        let r = try execute(["files": ["f": "x"], "arguments": ["/bin/sh", "-c", "echo out > o.txt"], "output_files": ["o.txt"]])
        XCTAssertEqual(r.exitCode, 0, r.stderr)
        let m = try XCTUnwrap(r["metadata"] as? [String: Any])
        XCTAssertTrue((m["worker"] as? String)?.contains(worker.cacheDir) ?? false, "\(m)")
        let order = ["input_fetch_start_timestamp", "input_fetch_completed_timestamp", "execution_start_timestamp",
                     "execution_completed_timestamp", "output_upload_start_timestamp", "output_upload_completed_timestamp"]
        let times = order.compactMap { m[$0] as? Double }
        XCTAssertEqual(times.count, order.count, "\(m)")
        XCTAssertEqual(times, times.sorted(), "\(m)")
        XCTAssertEqual(try worker.metric("casfs_worker_actions_total", "outcome=\"success\"") - before, 1)
        XCTAssertGreaterThan(try worker.metric("casfs_worker_uploaded_bytes_total"), 0)
        XCTAssertGreaterThan(try worker.metric("casfs_worker_action_duration_seconds_count"), 0)
        XCTAssertGreaterThan(try worker.metric("casfs_worker_input_fetch_duration_seconds_count"), 0)
        XCTAssertTrue(try worker.metricsText().contains("casfs_worker_leases_held"))
    }
}
