import CASProcess
import CASSandbox
import Foundation
import TestSupport
import XCTest

/// The sandbox of `casfs run`, driven from library code as the worker uses it.
final class SandboxTests: XCTestCase {
    var tmp = ""

    override func setUpWithError() throws {
        tmp = try makeMountTempDir("SandboxTests")
    }

    override func tearDown() {
        if !tmp.isEmpty { try? FileManager.default.removeItem(atPath: tmp) }
    }

    func testOutputsGoToFilesAndTheExitCodeIsReported() throws {
        let sandbox = try Sandbox()
        let out = tmp + "/out"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        let spec = SandboxSpec(output: out, workingDirectory: Sandbox.output, environment: ["PATH": "/usr/bin:/bin", "ONLY": "this"])
        try sandbox.check(spec)
        let r = try sandbox.run(spec, command: ["sh", "-c", "echo to-out; echo to-err >&2; env | sort > env.txt; pwd > pwd.txt; exit 3"],
                                stdout: .file(tmp + "/stdout"), stderr: .file(tmp + "/stderr"))
        XCTAssertEqual(r, SandboxResult(termination: .exited(3), started: true, timedOut: false))
        XCTAssertEqual(try String(contentsOfFile: tmp + "/stdout", encoding: .utf8), "to-out\n")
        XCTAssertEqual(try String(contentsOfFile: tmp + "/stderr", encoding: .utf8), "to-err\n")
        XCTAssertEqual(try String(contentsOfFile: out + "/pwd.txt", encoding: .utf8), "/out\n")
        let env = try String(contentsOfFile: out + "/env.txt", encoding: .utf8)
        XCTAssertTrue(env.contains("ONLY=this\n"), env)
        XCTAssertFalse(env.contains("HOME="), "only the environment given: \(env)")
    }

    func testExtraMountsInOrder() throws {
        let sandbox = try Sandbox()
        let ro = tmp + "/ro"
        let rw = tmp + "/rw"
        for d in [ro, rw] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        try "input\n".write(toFile: ro + "/f", atomically: true, encoding: .utf8)
        let spec = SandboxSpec(mounts: [
            .tmpfs("/work"),
            .bind(SandboxBind(source: ro, destination: "/work/in", writable: false)),
            .bind(SandboxBind(source: rw, destination: "/work/out", writable: true)),
            .symlink(target: "in/f", path: "/work/link"),
        ], workingDirectory: "/work")
        let r = try sandbox.run(spec, command: ["sh", "-c", "cat link > out/copy && touch scratch && ! touch in/g"],
                                stdout: .null, stderr: .file(tmp + "/stderr"))
        XCTAssertEqual(r.termination, .exited(0), (try? String(contentsOfFile: tmp + "/stderr", encoding: .utf8)) ?? "")
        XCTAssertEqual(try String(contentsOfFile: rw + "/copy", encoding: .utf8), "input\n")
        XCTAssertFalse(FileManager.default.fileExists(atPath: ro + "/g"))
    }

    /// Past the deadline the whole sandbox goes, background processes included.
    func testDeadlineKillsTheWholeSandbox() throws {
        let sandbox = try Sandbox()
        let marker = "\(Int.random(in: 100_000...999_999))"
        let r = try sandbox.run(SandboxSpec(), command: ["sh", "-c", "sleep 7\(marker) & sleep 8\(marker) & wait"],
                                stdout: .null, stderr: .null, timeout: 1)
        XCTAssertTrue(r.timedOut)
        XCTAssertEqual(r.termination, .signaled(SIGKILL))
        XCTAssertTrue(pollUntil(30) { !runShell("pgrep -f 'sleep [78]\(marker)'").ok }, "a process of the sandbox outlived it")
    }

    func testACommandThatCannotStartIsNotStarted() throws {
        let sandbox = try Sandbox()
        let r = try sandbox.run(SandboxSpec(), command: ["/no/such/program"], stdout: .null, stderr: .file(tmp + "/err"))
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(((try? String(contentsOfFile: tmp + "/err", encoding: .utf8)) ?? "").contains("/no/such/program"))
    }
}
