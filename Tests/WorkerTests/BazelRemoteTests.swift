import Foundation
import TestSupport
import XCTest

/// Debian's Bazel (bazel-bootstrap 4.2.3, offline) builds Tests/bazel
/// remotely through a real BuildGrid on a real `casfs worker`: genrules, an
/// output directory, a cc_binary and a test that runs it.
final class BazelRemoteTests: XCTestCase {
    nonisolated(unsafe) static var shared: (dir: String, grid: BuildGridExecution, worker: WorkerProcess)?
    nonisolated(unsafe) static var setUpError: Error?

    override class func setUp() {
        super.setUp()
        do {
            try requireFuse()
            guard FileManager.default.isExecutableFile(atPath: "/usr/bin/bazel") else {
                throw TestSupportError("bazel is not installed (Debian package bazel-bootstrap): run scripts/install-deps")
            }
            let dir = try makeMountTempDir("casfs-bazel")
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
            _ = runShell("rm -rf \(shq(s.dir))")
        }
        shared = nil
        super.tearDown()
    }

    override func setUpWithError() throws {
        if let e = Self.setUpError { throw e }
    }

    var dir: String { Self.shared!.dir }
    var grid: BuildGridExecution { Self.shared!.grid }

    /// A fresh copy of the workspace.
    func workspace(_ name: String) throws -> String {
        let ws = dir + "/" + name
        let r = runShell("cp -r \(shq(BuildGridVenv.packageRoot + "/Tests/bazel")) \(shq(ws))")
        guard r.ok else { throw TestSupportError("copying the workspace: \(r)") }
        return ws
    }

    /// `bazel --batch ... COMMAND ARGS` in `ws` with its own output root.
    func bazel(_ ws: String, _ command: String, _ args: [String], remote: Bool) -> ShellResult {
        var flags = ["--jobs=2", "--color=no", "--curses=no", "--show_progress=no"]
        if remote {
            flags += ["--remote_executor=\(grid.url)", "--remote_instance_name=\(grid.instance)",
                      "--remote_default_exec_properties=OSFamily=linux", "--spawn_strategy=remote",
                      "--remote_timeout=120"]
        } else {
            flags += ["--spawn_strategy=local"]
        }
        let startup = "--batch --output_user_root=\(shq(ws + "/.bazel-root")) --host_jvm_args=-Xmx768m"
        let cmd = "cd \(shq(ws)) && bazel \(startup) \(command) \(flags.joined(separator: " ")) \(args.map(shq).joined(separator: " ")) 2>&1"
        return runShell(cmd)
    }

    /// The counts of the `INFO: N processes: ...` line: kind -> count.
    func processes(_ output: String) -> [String: Int] {
        guard let line = output.split(separator: "\n").last(where: { $0.contains(" processes: ") || $0.hasSuffix(" processes.") }) else { return [:] }
        var out: [String: Int] = [:]
        let body = line.components(separatedBy: "processes: ").last ?? ""
        for part in body.trimmingCharacters(in: CharacterSet(charactersIn: ". ")).components(separatedBy: ", ") {
            let words = part.split(separator: " ", maxSplits: 1)
            if words.count == 2, let n = Int(words[0]) { out[String(words[1]), default: 0] += n }
        }
        return out
    }

    func testRemoteBuildMatchesLocalAndRebuildIsAllCacheHits() throws {
        let remoteWS = try workspace("remote")
        let localWS = try workspace("local")
        let targets = ["//:greeting", "//:tree", "//:hello", "//:ran"]

        let local = bazel(localWS, "build", targets, remote: false)
        XCTAssertTrue(local.ok, local.stdout)

        let remote = bazel(remoteWS, "build", targets, remote: true)
        XCTAssertTrue(remote.ok, "\(remote.stdout)\nworker log:\n\(Self.shared!.worker.log().suffix(3000))")
        let counts = processes(remote.stdout)
        XCTAssertGreaterThan(counts["remote"] ?? 0, 3, "every action remote: \(counts)\n\(remote.stdout)")
        XCTAssertEqual(Set(counts.keys).subtracting(["remote", "internal"]), [], "nothing ran locally: \(counts)")

        // The same bytes as the local build.
        for path in ["greeting.txt", "tree.d/copy.txt", "tree.d/sub/n.txt", "ran.txt", "hello"] {
            let a = FileManager.default.contents(atPath: "\(remoteWS)/bazel-bin/\(path)")
            let b = FileManager.default.contents(atPath: "\(localWS)/bazel-bin/\(path)")
            XCTAssertNotNil(a, path)
            XCTAssertEqual(a, b, "\(path) differs between the remote and the local build")
        }
        XCTAssertEqual(try String(contentsOfFile: remoteWS + "/bazel-bin/greeting.txt", encoding: .utf8), "HELLO CASFS\n")
        XCTAssertEqual(try String(contentsOfFile: remoteWS + "/bazel-bin/ran.txt", encoding: .utf8), "hello world\n")
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: remoteWS + "/bazel-bin/tree.d/link"), "copy.txt")

        // A test that runs the remotely built binary, remotely.
        let test = bazel(remoteWS, "test", ["//:hello_test"], remote: true)
        XCTAssertTrue(test.ok, test.stdout)
        XCTAssertTrue(test.stdout.contains("//:hello_test") && test.stdout.contains("PASSED"), test.stdout)

        // After `bazel clean`, everything comes from BuildGrid's action cache.
        let clean = bazel(remoteWS, "clean", [], remote: false)
        XCTAssertTrue(clean.ok, clean.stdout)
        let again = bazel(remoteWS, "build", targets, remote: true)
        XCTAssertTrue(again.ok, again.stdout)
        let hits = processes(again.stdout)
        XCTAssertGreaterThan(hits["remote cache hit"] ?? 0, 3, "\(hits)\n\(again.stdout)")
        XCTAssertNil(hits["remote"], "a rebuild after bazel clean executed actions: \(hits)")
    }

    func testAFailingActionReachesBazel() throws {
        let ws = try workspace("failing")
        let r = bazel(ws, "build", ["//:fails"], remote: true)
        XCTAssertFalse(r.ok, r.stdout)
        XCTAssertTrue(r.stdout.contains("failing-on-purpose"), "the action's stderr reaches Bazel:\n\(r.stdout)")
        XCTAssertTrue(r.stdout.contains("Exit 3"), "the exit code reaches Bazel:\n\(r.stdout)")
    }
}
