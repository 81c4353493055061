import CASCore
import CASStorage
import CASTree
import Foundation
import REAPI
import SwiftProtobuf
import XCTest

typealias PBDirectory = Build_Bazel_Remote_Execution_V2_Directory
typealias PBFile = Build_Bazel_Remote_Execution_V2_FileNode
typealias PBDir = Build_Bazel_Remote_Execution_V2_DirectoryNode
typealias PBLink = Build_Bazel_Remote_Execution_V2_SymlinkNode

func pbDigest(_ d: Digest) -> Build_Bazel_Remote_Execution_V2_Digest {
    .with { $0.hash = d.hash; $0.sizeBytes = d.size }
}

func file(_ name: String, _ content: String = "x", exec: Bool = false) -> PBFile {
    .with { $0.name = name; $0.digest = pbDigest(Digest.of(Data(content.utf8))); $0.isExecutable = exec }
}

func dir(_ name: String, _ d: Digest = .empty) -> PBDir {
    .with { $0.name = name; $0.digest = pbDigest(d) }
}

func link(_ name: String, _ target: String) -> PBLink {
    .with { $0.name = name; $0.target = target }
}

/// Bytes of a Directory built as given: no sorting, no checks.
func raw(files: [PBFile] = [], dirs: [PBDir] = [], links: [PBLink] = []) -> Data {
    var m = PBDirectory()
    m.files = files
    m.directories = dirs
    m.symlinks = links
    return try! m.serializedBytes()
}

final class TreeDirectoryTests: XCTestCase {
    func parseError(_ data: Data, file: StaticString = #filePath, line: UInt = #line) -> TreeError? {
        do {
            _ = try TreeDirectory(parsing: data)
            XCTFail("parsed a bad Directory", file: file, line: line)
            return nil
        } catch {
            return error
        }
    }

    func testEmptyDirectoryIsTheEmptyBlob() throws {
        let bytes = try DirectoryBuilder().encoded()
        XCTAssertEqual(bytes.count, 0)
        XCTAssertEqual(Digest.of(bytes), Digest.empty)
        XCTAssertEqual(try TreeDirectory(parsing: bytes).entries.count, 0)
    }

    func testBuilderSortsBytewiseAndRoundTrips() throws {
        var b = DirectoryBuilder()
        let d1 = Digest.of(Data("one".utf8))
        b.addFile("b.txt", d1, executable: false)
        b.addFile("B.sh", d1, executable: true)
        b.addFile("\u{e9}", d1, executable: false)   // é: two UTF-8 bytes, after every ASCII name
        b.addDirectory("sub", .empty)
        b.addSymlink("a-link", target: "../x")
        let bytes = try b.encoded()
        let m = try PBDirectory(serializedBytes: bytes)
        XCTAssertEqual(m.files.map(\.name), ["B.sh", "b.txt", "\u{e9}"])
        XCTAssertEqual(m.files.map(\.isExecutable), [true, false, false])
        let t = try TreeDirectory(parsing: bytes)
        XCTAssertEqual(t.entries.map(\.name), ["B.sh", "a-link", "b.txt", "sub", "\u{e9}"])
        XCTAssertEqual(t.subdirectoryCount, 1)
        XCTAssertEqual(t.entry(named: Array("sub".utf8))?.kind, .directory(.empty))
        XCTAssertEqual(t.entry(named: Array("a-link".utf8))?.kind, .symlink(target: "../x"))
        XCTAssertEqual(t.entry(named: Array("B.sh".utf8))?.kind, .file(d1, executable: true))
        XCTAssertNil(t.entry(named: Array("b.sh".utf8)))
        // Unicode-equivalent but different bytes (e + combining acute) is another name.
        XCTAssertNil(t.entry(named: Array("e\u{301}".utf8)))
    }

    func testCanonicalEncodingIsStable() throws {
        // Same children in any order give the same bytes; defaults are left out.
        var a = DirectoryBuilder(), b = DirectoryBuilder()
        let d = Digest.of(Data("z".utf8))
        a.addFile("x", d, executable: false); a.addFile("y", d, executable: true); a.addSymlink("l", target: "x")
        b.addSymlink("l", target: "x"); b.addFile("y", d, executable: true); b.addFile("x", d, executable: false)
        XCTAssertEqual(try a.encoded(), try b.encoded())
        // A non-executable file has no field 4 on the wire.
        var c = DirectoryBuilder()
        c.addFile("x", d, executable: false)
        XCTAssertEqual(try c.encoded(), raw(files: [file("x", "z")]))
    }

    func testUnparsableBlobs() {
        for bytes in [Data([0xff, 0xff, 0xff]), Data("hello\n".utf8), Data([0x0a, 0x05, 0x0a])] {
            guard let e = parseError(bytes) else { continue }
            switch e {
            case .unparsable, .unknownFields: break
            default: XCTFail("\(e)")
            }
        }
    }

    func testUnknownFieldsAreRejected() {
        var bytes = raw(files: [file("a")])
        bytes += Data([0x48, 0x01])  // field 9, varint 1
        XCTAssertEqual(parseError(bytes), .unknownFields("the Directory"))
        var f = file("a")
        try! f.merge(serializedBytes: [0x38, 0x01])  // field 7 inside a FileNode
        XCTAssertEqual(parseError(raw(files: [f])), .unknownFields("file \"a\""))
    }

    func testBadNames() {
        XCTAssertEqual(parseError(raw(files: [file("")])), .badName("", reason: "empty"))
        XCTAssertEqual(parseError(raw(files: [file(".")])), .badName(".", reason: "not a child"))
        XCTAssertEqual(parseError(raw(dirs: [dir("..")])), .badName("..", reason: "not a child"))
        XCTAssertEqual(parseError(raw(files: [file("a/b")])), .badName("a/b", reason: "contains /"))
        XCTAssertEqual(parseError(raw(links: [link("/etc", "x")])), .badName("/etc", reason: "contains /"))
        XCTAssertEqual(parseError(raw(files: [file("a\0b")])), .badName("a\0b", reason: "contains a NUL byte"))
        let long = String(repeating: "n", count: 256)
        XCTAssertEqual(parseError(raw(files: [file(long)])), .badName(long, reason: "longer than 255 bytes"))
    }

    func testOrderAndDuplicates() {
        XCTAssertEqual(parseError(raw(files: [file("b"), file("a")])), .unsorted("a", after: "b"))
        XCTAssertEqual(parseError(raw(dirs: [dir("b"), dir("a")])), .unsorted("a", after: "b"))
        XCTAssertEqual(parseError(raw(links: [link("b", "x"), link("a", "x")])), .unsorted("a", after: "b"))
        XCTAssertEqual(parseError(raw(files: [file("a"), file("a", "other")])), .duplicate("a"))
        XCTAssertEqual(parseError(raw(files: [file("a")], dirs: [dir("a")])), .duplicate("a"))
        XCTAssertEqual(parseError(raw(dirs: [dir("a")], links: [link("a", "x")])), .duplicate("a"))
        // Bytewise order: "Z" (0x5a) before "a" (0x61) is sorted; the reverse is not.
        XCTAssertNoThrow(try TreeDirectory(parsing: raw(files: [file("Z"), file("a")])))
        XCTAssertEqual(parseError(raw(files: [file("a"), file("Z")])), .unsorted("Z", after: "a"))
    }

    func testBadDigestsAndSymlinks() {
        var f = file("a")
        f.digest.hash = String(repeating: "A", count: 64)
        guard case .badDigest("a", _)? = parseError(raw(files: [f])) else { return XCTFail() }
        var d = dir("d")
        d.digest.sizeBytes = -1
        guard case .badDigest("d", _)? = parseError(raw(dirs: [d])) else { return XCTFail() }
        var missing = dir("m")
        missing.clearDigest()
        guard case .badDigest("m", _)? = parseError(raw(dirs: [missing])) else { return XCTFail() }
        XCTAssertEqual(parseError(raw(links: [link("l", "")])), .badSymlink("l", reason: "empty target"))
        XCTAssertEqual(parseError(raw(links: [link("l", "a\0b")])), .badSymlink("l", reason: "NUL byte in target"))
    }

    func testNodeProperties() throws {
        var f = file("a")
        f.nodeProperties.mtime = .with { $0.seconds = 1_600_000_000; $0.nanos = 5 }
        f.nodeProperties.unixMode = .with { $0.value = 0o104755 }  // setuid is dropped
        var m = PBDirectory()
        m.files = [f]
        m.nodeProperties.unixMode = .with { $0.value = 0o700 }
        let t = try TreeDirectory(parsing: try m.serializedBytes())
        XCTAssertEqual(t.entries[0].properties, TreeNodeProperties(mtime: TreeTime(seconds: 1_600_000_000, nanos: 5), mode: 0o755))
        XCTAssertEqual(t.properties.mode, 0o700)
        f.nodeProperties.mtime.nanos = 1_000_000_000
        guard case .badProperties("a", _)? = parseError(raw(files: [f])) else { return XCTFail() }
    }
}

final class DirectoryCacheTests: XCTestCase {
    func testLoadsAbsentInvalidAndEvicts() throws {
        let store = EmptyBlobStorage(MemoryStorage(maxBytes: 1 << 20))
        let metrics = Metrics()
        let good = raw(files: [file("a")])
        let bad = raw(files: [file("b"), file("a")])
        try store.commitWrite(Digest.of(good), DataSource(good))
        try store.commitWrite(Digest.of(bad), DataSource(bad))
        let cache = DirectoryCache(storage: store, capacity: 4096, metrics: metrics)
        guard case .directory(let t) = try cache.load(Digest.of(good)) else { return XCTFail() }
        XCTAssertEqual(t.entries.map(\.name), ["a"])
        guard case .invalid(.unsorted("a", after: "b")) = try cache.load(Digest.of(bad)) else { return XCTFail() }
        guard case .absent = try cache.load(Digest.of(Data("nope".utf8))) else { return XCTFail() }
        guard case .directory(let e) = try cache.load(.empty) else { return XCTFail() }
        XCTAssertTrue(e.entries.isEmpty)
        // A second load is a hit, even once the blob is gone from the store.
        try store.deleteBlob(Digest.of(good))
        guard case .directory = try cache.load(Digest.of(good)) else { return XCTFail() }
        XCTAssertEqual(metrics.total(MetricCatalog.treeHits), 1)

        // Many directories: the cache stays within its bound.
        for i in 0..<200 {
            let data = raw(files: [file("f\(i)", "content \(i)")])
            try store.commitWrite(Digest.of(data), DataSource(data))
            guard case .directory = try cache.load(Digest.of(data)) else { return XCTFail() }
        }
        XCTAssertLessThanOrEqual(metrics.total(MetricCatalog.treeCachedBytes), 4096)
        XCTAssertLessThan(cache.count, 200)
    }

    func testStorageErrorsAreThrownNotCached() throws {
        struct Failing: Storage {
            func hasBlob(_ digest: Digest) throws -> Bool { throw StorageError.unavailable("down") }
            func getBlob(_ digest: Digest) throws -> BlobSource? { throw StorageError.unavailable("down") }
            func deleteBlob(_ digest: Digest) throws {}
            func commitWrite(_ digest: Digest, _ source: BlobSource) throws {}
        }
        let cache = DirectoryCache(storage: Failing())
        XCTAssertThrowsError(try cache.load(Digest.of(Data("x".utf8))))
        XCTAssertEqual(cache.count, 0)
    }
}
