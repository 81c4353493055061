import Foundation
import Redis
import TestSupport
import XCTest

/// The hiredis transport against fake servers (replies of every kind, split
/// writes, a server closing mid-reply or mid-write, stalling, sending garbage) and long
/// streamed pipelines against a real one.
final class RedisFaultTests: XCTestCase {
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

    /// Commands whose replies `sample` stands for (the fake server ignores them).
    static let sampleCommands: [[RedisArgument]] = Array(repeating: ["PING"], count: sample.replies.count)

    // MARK: - Against a fake server

    /// A one-connection server on a unix socket that answers the first read
    /// with `reply` and then closes (or keeps silent when `close` is false).
    final class FakeServer: @unchecked Sendable {
        let path: String
        let listener: Int32
        let done = DispatchSemaphore(value: 0)

        /// `piece`: when set, the reply is written in pieces of that many bytes, 1 ms apart.
        init(reply: [UInt8], close closeAfter: Bool = true, piece: Int? = nil) throws {
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
                    reply.withUnsafeBytes { all in
                        let step = piece ?? max(all.count, 1)
                        var i = 0
                        while i < all.count {
                            let n = min(step, all.count - i)
                            _ = write(c, all.baseAddress! + i, n)
                            i += n
                            if piece != nil { usleep(1000) }
                        }
                    }
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

    func testAllKindsOfRepliesAtOnce() throws {
        let server = try FakeServer(reply: Self.sample.bytes)
        let pool = RedisPool(RedisConfig(unixSocket: server.path, connectTimeout: 1, commandTimeout: 1))
        XCTAssertEqual(try pool.pipeline(Self.sampleCommands), Self.sample.replies)
        XCTAssertEqual(pool.openConnections, 1)
        pool.close()
        server.done.wait()
    }

    func testRepliesArrivingInSmallPieces() throws {
        for piece in [1, 3, 7] {
            let server = try FakeServer(reply: Self.sample.bytes, piece: piece)
            let pool = RedisPool(RedisConfig(unixSocket: server.path, connectTimeout: 1, commandTimeout: 1))
            let replies = try pool.pipeline(count: Self.sampleCommands.count) { batch, i in batch.append(Self.sampleCommands[i]) }
            XCTAssertEqual(replies, Self.sample.replies, "pieces of \(piece) bytes")
            pool.close()
            server.done.wait()
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

    func testServerClosingWhileALargeBatchIsWrittenIsAnErrorNotASignal() throws {
        // The server reads 4 KiB and closes: the rest of the write fails with
        // EPIPE, which must come back as an error (SIGPIPE would kill the process).
        let value = [UInt8](repeating: UInt8(ascii: "v"), count: 1 << 20)
        for streamed in [false, true] {
            let server = try FakeServer(reply: [])
            let pool = RedisPool(RedisConfig(unixSocket: server.path, connectTimeout: 1, commandTimeout: 1))
            XCTAssertThrowsError(try {
                if streamed {
                    _ = try pool.pipeline(count: 8) { batch, i in batch.append(["SET", .string("k\(i)"), .bytes(value)]) }
                } else {
                    _ = try pool.pipeline((0..<8).map { ["SET", .string("k\($0)"), .bytes(value)] })
                }
            }()) { error in
                guard case RedisError.io = error else { return XCTFail("\(error)") }
            }
            XCTAssertEqual(pool.openConnections, 0)
            server.done.wait()
        }
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
