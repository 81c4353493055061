@testable import CASWorker
import REAPI
import XCTest

/// The paths of a Command are checked before anything runs.
final class CommandPathsTests: XCTestCase {
    func command(wd: String = "", files: [String] = [], dirs: [String] = [], paths: [String] = []) -> RECommand {
        var c = RECommand()
        c.arguments = ["true"]
        c.workingDirectory = wd
        c.outputFiles = files
        c.outputDirectories = dirs
        c.outputPaths = paths
        return c
    }

    func testPlainRelativePathsAreAccepted() throws {
        let p = try CommandPaths(command(wd: "src/", files: ["out/a.txt"], dirs: ["gen/d"], paths: ["x"]))
        XCTAssertEqual(p.workingDirectory, ["src"])
        XCTAssertEqual(p.directoriesToPrepare, [[], ["src"], ["src", "out"], ["src", "gen"]])
    }

    func testPathsLeavingTheExecRootAreRefused() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", ""] {
            XCTAssertThrowsError(try CommandPaths(command(files: [bad])), bad) { error in
                XCTAssertEqual((error as? WorkerFailure)?.code, .invalidArgument)
            }
        }
        XCTAssertThrowsError(try CommandPaths(command(wd: "../up")))
        XCTAssertThrowsError(try CommandPaths(command(paths: ["/abs"])))
    }

    func testTheWorkingDirectoryItselfMayBeAnOutputDirectory() throws {
        let p = try CommandPaths(command(wd: "w", dirs: [""]))
        XCTAssertEqual(p.all.map(\.fromRoot), [["w"]])
    }
}
