import Foundation
import Redis
import TestSupport
import XCTest

final class RESPReaderTests: XCTestCase {
    /// A stream of several replies of every kind, and what they decode to.
    static let sample: (bytes: [UInt8], replies: [RedisReply]) = {
        let binary: [UInt8] = [0, 1, 13, 10, 36, 42, 13, 10, 255, 13]
        var b: [UInt8] = []
        b += Array(":0\r\n:1\r\n:-42\r\n:9223372036854775807\r\n:-9223372036854775808\r\n".utf8)
        b += Array("+OK\r\n-ERR wrong type\r\n$-1\r\n*-1\r\n$0\r\n\r\n".utf8)
        b += Array("$\(binary.count)\r\n".utf8) + binary + [13, 10]
        b += Array("*0\r\n*3\r\n:1\r\n*2\r\n$1\r\na\r\n*1\r\n$-1\r\n-ERR inner\r\n".utf8)
        b += Array("*2\r\n*1\r\n*0\r\n+PONG\r\n".utf8)
        let replies: [RedisReply] = [
            .integer(0), .integer(1), .integer(-42), .integer(Int64.max), .integer(Int64.min),
            .status("OK"), .error("ERR wrong type"), .null, .null, .bulk([]),
            .bulk(binary),
            .array([]), .array([.integer(1), .array([.bulk([UInt8(ascii: "a")]), .array([.null])]), .error("ERR inner")]),
            .array([.array([.array([])]), .status("PONG")]),
        ]
        return (b, replies)
    }()

    func drain(_ r: RESPReader) throws -> [RedisReply] {
        var out: [RedisReply] = []
        while let x = try r.next() { out.append(x) }
        return out
    }

    func testAllKindsAtOnce() throws {
        let r = RESPReader()
        r.feed(Self.sample.bytes)
        XCTAssertEqual(try drain(r), Self.sample.replies)
        XCTAssertTrue(r.isIdle)
    }

    func testSplitAtEveryBytePosition() throws {
        let bytes = Self.sample.bytes
        for cut in 0...bytes.count {
            let r = RESPReader(capacity: 16)
            r.feed(Array(bytes[..<cut]))
            var got = try drain(r)
            r.feed(Array(bytes[cut...]))
            got += try drain(r)
            XCTAssertEqual(got, Self.sample.replies, "split at \(cut)")
            XCTAssertTrue(r.isIdle, "split at \(cut)")
        }
    }

    func testOneByteAtATime() throws {
        let r = RESPReader(capacity: 16)
        var got: [RedisReply] = []
        for b in Self.sample.bytes {
            r.feed([b])
            got += try drain(r)
        }
        XCTAssertEqual(got, Self.sample.replies)
    }

    func testLargeBulkAndLargeArrayInPieces() throws {
        let big = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        var bytes = Array("$\(big.count)\r\n".utf8) + big + [13, 10]
        bytes += Array("*20000\r\n".utf8)
        for i in 0..<20_000 { bytes += Array(":\(i)\r\n".utf8) }
        let r = RESPReader(capacity: 16)
        var got: [RedisReply] = []
        var i = 0
        while i < bytes.count {
            let n = min(997, bytes.count - i)
            r.feed(Array(bytes[i..<(i + n)]))
            got += try drain(r)
            i += n
        }
        XCTAssertEqual(got.count, 2)
        XCTAssertEqual(got[0], .bulk(big))
        XCTAssertEqual(got[1], .array((0..<20_000).map { .integer(Int64($0)) }))
    }

    func testMalformedInputThrows() {
        for bad in [
            "?what\r\n", ":12a\r\n", ":\r\n", ":99999999999999999999\r\n", "$-2\r\n", "$3\r\nabcXY",
            "*-5\r\n", "+OK\rX", ":-\r\n",
        ] {
            let r = RESPReader()
            r.feed(Array(bad.utf8))
            XCTAssertThrowsError(try drain(r), bad) { error in
                guard case RedisError.io(let m) = error else { return XCTFail("\(bad): \(error)") }
                XCTAssertTrue(m.contains("protocol error"), m)
            }
        }
        let deep = RESPReader()
        deep.feed(Array(String(repeating: "*1\r\n", count: RESPReader.maxDepth + 1).utf8))
        XCTAssertThrowsError(try drain(deep))
    }

    func testIncompleteIsNotAReply() throws {
        let r = RESPReader()
        r.feed(Array("*2\r\n:1\r\n$5\r\nab".utf8))
        XCTAssertNil(try r.next())
        XCTAssertFalse(r.isIdle)
        r.feed(Array("cde\r\n".utf8))
        XCTAssertEqual(try r.next(), .array([.integer(1), .bulk(Array("abcde".utf8))]))
        XCTAssertNil(try r.next())
    }

    // MARK: - Against a fake server

    /// A one-connection server on a unix socket that answers the first read
    /// with `reply` and then closes (or keeps silent when `close` is false).
    final class FakeServer: @unchecked Sendable {
        let path: String
        let listener: Int32
        let done = DispatchSemaphore(value: 0)

        init(reply: [UInt8], close closeAfter: Bool = true) throws {
            path = FileManager.default.temporaryDirectory.appendingPathComponent("casfs-fake-\(getpid())-\(UUID().uuidString.prefix(8)).sock").path
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            listener = fd
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { raw in
                let b = Array(path.utf8)
                raw.copyBytes(from: b)
                raw[b.count] = 0
            }
            let ok = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard ok == 0, listen(fd, 4) == 0 else { throw TestSupportError("cannot listen on \(path)") }
            let done = self.done
            Thread.detachNewThread {
                let c = accept(fd, nil, nil)
                if c >= 0 {
                    var buf = [UInt8](repeating: 0, count: 4096)
                    _ = read(c, &buf, buf.count)
                    _ = reply.withUnsafeBytes { write(c, $0.baseAddress, $0.count) }
                    if closeAfter {
                        close(c)
                    } else {
                        usleep(1_500_000)
                        close(c)
                    }
                }
                done.signal()
            }
        }

        deinit {
            close(listener)
            unlink(path)
        }
    }

    func testServerClosingMidReplyIsAnErrorAndTheConnectionIsDropped() throws {
        let server = try FakeServer(reply: Array("*3\r\n:1\r\n$10\r\nabc".utf8))
        let pool = RedisPool(RedisConfig(unixSocket: server.path, connectTimeout: 1, commandTimeout: 1))
        XCTAssertThrowsError(try pool.command("LRANGE", "k", "0", "-1")) { error in
            guard case RedisError.io(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("closed"), m)
        }
        XCTAssertEqual(pool.openConnections, 0)
        server.done.wait()
    }

    func testServerSendingGarbageIsAnError() throws {
        let server = try FakeServer(reply: Array("hello\r\n".utf8))
        let pool = RedisPool(RedisConfig(unixSocket: server.path, connectTimeout: 1, commandTimeout: 1))
        XCTAssertThrowsError(try pool.command("PING")) { error in
            guard case RedisError.io(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("protocol error"), m)
        }
        XCTAssertEqual(pool.openConnections, 0)
        server.done.wait()
    }

    func testServerStallingMidReplyTimesOut() throws {
        let server = try FakeServer(reply: Array("$10\r\nabc".utf8), close: false)
        let pool = RedisPool(RedisConfig(unixSocket: server.path, connectTimeout: 1, commandTimeout: 0.3))
        XCTAssertThrowsError(try pool.command("GET", "k")) { error in
            guard case RedisError.io(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("timed out"), m)
        }
        XCTAssertEqual(pool.openConnections, 0)
        server.done.wait()
    }

    // MARK: - Streamed pipelines against a real server

    func testStreamedPipelineOverManyChunks() throws {
        let server = try RedisServer.tcp()
        let pool = server.pool()
        let n = 30_000
        let value = Array(repeating: UInt8(ascii: "v"), count: 100)
        let sets = try pool.pipeline(count: n) { batch, i in
            batch.append(["SET", .string("k\(i)"), .bytes(value + Array(String(i).utf8))])
        }
        XCTAssertEqual(sets.count, n)
        XCTAssertTrue(sets.allSatisfy { $0 == .status("OK") })
        let gets = try pool.pipeline(count: n + 1) { batch, i in
            if i == n {
                batch.append(["LPUSH", "k0", "x"])  // an error reply in the middle of the stream is a value
            } else {
                batch.append(["GET", .string("k\(i)")])
            }
        }
        for i in 0..<n { XCTAssertEqual(gets[i], .bulk(value + Array(String(i).utf8)), "reply \(i)") }
        XCTAssertTrue(gets[n].isError)
        // The connection is still in step afterwards.
        XCTAssertEqual(try pool.command("GET", "k7"), .bulk(value + Array("7".utf8)))
        XCTAssertEqual(pool.openConnections, 1)
    }
}
