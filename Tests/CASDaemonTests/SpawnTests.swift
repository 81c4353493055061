import CASProcess
import Foundation
import TestSupport
import XCTest

/// Children started through `Spawn`: the descriptors they are given and
/// the limits they start with.
final class SpawnTests: XCTestCase {
    var tmp = ""

    override func setUpWithError() throws {
        tmp = NSTemporaryDirectory() + "casfs-spawn-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
    }

    override func tearDown() {
        if !tmp.isEmpty { try? FileManager.default.removeItem(atPath: tmp) }
    }

    /// Runs `script` under /bin/sh with `descriptors`; its standard output.
    func run(_ script: String, descriptors: [Int32: Int32] = [:], stdout: Int32? = nil) throws -> String {
        let out = tmp + "/out-\(UUID().uuidString.prefix(8))"
        let fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        let pid = try Spawn.start("/bin/sh", ["sh", "-c", script], stdout: .descriptor(stdout ?? fd), stderr: .inherit,
                                  descriptors: descriptors).get()
        XCTAssertEqual(Spawn.wait(pid), 0)
        return try String(contentsOfFile: out, encoding: .utf8)
    }

    func openFile(_ name: String) -> Int32 {
        let fd = open(tmp + "/" + name, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        return fd
    }

    /// What each of the child's descriptors `fds` refers to.
    func links(_ fds: [Int32], descriptors: [Int32: Int32]) throws -> [Int32: String] {
        let script = fds.map { "echo \($0)=$(readlink /proc/self/fd/\($0))" }.joined(separator: "; ")
        var result: [Int32: String] = [:]
        for line in try run(script, descriptors: descriptors).split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1)
            guard parts.count == 2, let fd = Int32(parts[0]) else { continue }
            result[fd] = String(parts[1])
        }
        return result
    }

    /// A map whose sources are other entries' targets ([a: b, b: a], a
    /// cycle of three, [a: pipe, b: a]): each target gets the file its
    /// source is here, not what an earlier step put at that number.
    func testADescriptorMapWhoseSourcesAreTargetsIsAppliedAsAWhole() throws {
        let a = openFile("a"), b = openFile("b"), c = openFile("c")
        defer { [a, b, c].forEach { close($0) } }
        let path = { (name: String) in (self.tmp as NSString).resolvingSymlinksInPath + "/" + name }

        let swapped = try links([a, b], descriptors: [a: b, b: a])
        XCTAssertEqual(swapped[a], path("b"))
        XCTAssertEqual(swapped[b], path("a"))

        let rotated = try links([a, b, c], descriptors: [a: b, b: c, c: a])
        XCTAssertEqual(rotated[a], path("b"))
        XCTAssertEqual(rotated[b], path("c"))
        XCTAssertEqual(rotated[c], path("a"))

        // [3: a pipe, 4: the lock] where the lock is descriptor 3 here: as [a: pipe, a+1: a].
        var pipe: [Int32] = [0, 0]
        XCTAssertEqual(Glibc.pipe(&pipe), 0)
        defer { close(pipe[0]); close(pipe[1]) }
        let next = a + 1 == b || a + 1 == c ? max(a, b, c) + 1 : a + 1
        let moved = try links([a, next], descriptors: [a: pipe[1], next: a])
        XCTAssertTrue(moved[a]?.hasPrefix("pipe:") == true, "\(moved)")
        XCTAssertEqual(moved[next], path("a"))

        // A standard stream whose source is a mapped target.
        let out = openFile("out")
        defer { close(out) }
        _ = try run("echo from-child", descriptors: [out: a], stdout: out)
        XCTAssertEqual(try String(contentsOfFile: tmp + "/out", encoding: .utf8), "from-child\n",
                       "stdout is the file `out` is here, not the one mapped onto its number")
    }

    /// After the daemon raises its soft limit of open descriptors, the
    /// children it starts get the original one back.
    func testChildrenStartWithTheSoftLimitFromBeforeTheRaise() throws {
        var saved = rlimit()
        XCTAssertEqual(getrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved), 0)
        XCTAssertGreaterThan(saved.rlim_max, 1000, "the hard limit leaves no room for the test")
        defer {
            Descriptors.restoreLimit()
            var back = saved
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &back)
        }
        XCTAssertLessThan(Descriptors.open().count, 900)
        var low = saved
        low.rlim_cur = 1000
        XCTAssertEqual(setrlimit(Int32(RLIMIT_NOFILE.rawValue), &low), 0)
        let raised = try XCTUnwrap(Descriptors.raiseLimitToHard())
        XCTAssertEqual(raised.before, 1000)
        XCTAssertEqual(raised.after, UInt64(saved.rlim_max))
        XCTAssertEqual(Descriptors.softLimit, UInt64(saved.rlim_max))

        let child = try run("ulimit -S -n; ulimit -H -n; grep 'Max open files' /proc/self/limits")
        let lines = child.split(separator: "\n")
        XCTAssertEqual(lines.first.map(String.init), "1000", child)
        XCTAssertEqual(lines.dropFirst().first.map(String.init), "\(saved.rlim_max)", "the hard limit is kept: \(child)")
        XCTAssertTrue(lines.last?.split(separator: " ", omittingEmptySubsequences: true).dropFirst(3).first == "1000", child)
        // Given descriptors still arrive.
        let a = openFile("a")
        defer { close(a) }
        let seen = try run("readlink /proc/self/fd/7; ulimit -S -n", descriptors: [7: a])
        XCTAssertEqual(seen, (tmp as NSString).resolvingSymlinksInPath + "/a\n1000\n")

        // Back at the original limit, children inherit it as it is.
        Descriptors.restoreLimit()
        XCTAssertEqual(Descriptors.softLimit, 1000)
        XCTAssertEqual(try run("ulimit -S -n"), "1000\n")
    }

    func testAProgramThatIsNotThereFailsAtOnce() throws {
        var saved = rlimit()
        XCTAssertEqual(getrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved), 0)
        defer {
            Descriptors.restoreLimit()
            var back = saved
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &back)
        }
        var low = saved
        low.rlim_cur = 1000
        XCTAssertEqual(setrlimit(Int32(RLIMIT_NOFILE.rawValue), &low), 0)
        XCTAssertNotNil(Descriptors.raiseLimitToHard())
        guard case .failure(let e) = Spawn.start(tmp + "/no-such-program", ["x"]) else {
            return XCTFail("a program that is not there started")
        }
        XCTAssertEqual(e.code, ENOENT)
    }
}
