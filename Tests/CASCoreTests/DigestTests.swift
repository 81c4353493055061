import CASCore
import Foundation
import XCTest

final class DigestTests: XCTestCase {
    let foo = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"

    func testParsesWellFormedNames() throws {
        let d = try XCTUnwrap(Digest(parsing: "\(foo)_3"))
        XCTAssertEqual(d.hash, foo)
        XCTAssertEqual(d.size, 3)
        XCTAssertEqual(d.description, "\(foo)_3")
        XCTAssertEqual(Digest(parsing: "\(foo)_0")?.size, 0)
        XCTAssertEqual(Digest(parsing: "\(foo)_9223372036854775807")?.size, Int64.max)
    }

    func testRejectsMalformedNames() {
        let bad = [
            "", "_3", foo, "\(foo)_", "\(foo)_03", "\(foo)_-3", "\(foo)_+3", "\(foo)_3 ", " \(foo)_3",
            foo.uppercased() + "_3", String(foo.dropLast()) + "_3", foo + "0_3", "\(foo)-3",
            "\(foo)_9223372036854775808", "\(foo)_99999999999999999999", "\(foo)_1a", "\(foo)_3/x",
            String(foo.dropLast()) + "g_3", "\(foo)__3",
        ]
        for name in bad {
            XCTAssertNil(Digest(parsing: name), "accepted \(name)")
            XCTAssertThrowsError(try Digest.parse(name))
        }
        XCTAssertThrowsError(try Digest(hash: "abc", size: 1))
        XCTAssertThrowsError(try Digest(hash: foo, size: -1))
    }

    func testHashesData() {
        XCTAssertEqual(Digest.of(Data("foo".utf8)).description, "\(foo)_3")
        XCTAssertEqual(Digest.of(Data()), Digest.empty)
        XCTAssertTrue(Digest.empty.isEmpty)
        XCTAssertFalse(Digest(parsing: "\(foo)_0")!.isEmpty)
    }

    func testStreamingHashEqualsOneShot() throws {
        var bytes = [UInt8](repeating: 0, count: 3 * streamChunkSize + 17)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
        let data = Data(bytes)
        var h = DigestHasher()
        var i = 0
        while i < data.count {
            let n = min(12345, data.count - i)
            h.update(data[i..<(i + n)])
            i += n
        }
        XCTAssertEqual(h.finalize(), Digest.of(data))
        XCTAssertEqual(try DataSource(data).computeDigest(), Digest.of(data))
    }

    func testRawHash() {
        let raw = Digest(parsing: "\(foo)_3")!.rawHash
        XCTAssertEqual(raw.count, 32)
        XCTAssertEqual(raw.prefix(3), [0x2c, 0x26, 0xb4])
        XCTAssertEqual(raw.last, 0xae)
    }

    func testVerify() throws {
        let data = Data("foo".utf8)
        XCTAssertNoThrow(try DataSource(data).verify(Digest.of(data)))
        XCTAssertThrowsError(try DataSource(Data("fox".utf8)).verify(Digest.of(data))) { e in
            guard case StorageError.digestMismatch = e else { return XCTFail("\(e)") }
        }
        XCTAssertThrowsError(try DataSource(Data("fooo".utf8)).verify(Digest.of(data))) { e in
            guard case StorageError.sizeMismatch = e else { return XCTFail("\(e)") }
        }
    }

    func testDataSourceRanges() throws {
        let s = DataSource(Data("hello world".utf8))
        XCTAssertEqual(try s.read(offset: 6, length: 100), Data("world".utf8))
        XCTAssertEqual(try s.read(offset: 11, length: 5), Data())
        XCTAssertEqual(try s.read(offset: 50, length: 5), Data())
        XCTAssertThrowsError(try s.read(offset: -1, length: 5))
    }

    func testFileSourceRanges() throws {
        let path = NSTemporaryDirectory() + "casfs-filesource-\(getpid())"
        try Data("hello world".utf8).write(to: URL(fileURLWithPath: path))
        defer { unlink(path) }
        let s = try FileSource(path: path)
        XCTAssertEqual(s.size, 11)
        XCTAssertEqual(try s.read(offset: 6, length: 100), Data("world".utf8))
        XCTAssertEqual(try s.read(offset: 20, length: 5), Data())
        XCTAssertThrowsError(try FileSource(path: path + ".absent")) { e in
            XCTAssertEqual((e as? StorageError)?.errno, ENOENT)
        }
    }
}
