import Foundation
import Redis
import Synchronization
import TestSupport
import XCTest

final class RedisClientTests: XCTestCase {
    func testPingOverUnixSocket() throws {
        let server = try RedisServer.unixSocket()
        let pool = server.pool()
        try pool.ping()
        XCTAssertEqual(try pool.command("SET", "k", "v"), .status("OK"))
        XCTAssertEqual(try pool.command("GET", "k"), .bulk(Array("v".utf8)))
        XCTAssertEqual(try pool.command("GET", "absent"), .null)
    }

    func testPipelineOverTCPKeepsOrderAndReturnsErrorRepliesAsValues() throws {
        let server = try RedisServer.tcp()
        let pool = server.pool()
        let replies = try pool.pipeline([
            ["SET", "a", "1"],
            ["INCRBY", "a", 41],
            ["LPUSH", "a", "x"],  // wrong type: an error reply, not a thrown error
            ["GET", "a"],
            ["EXISTS", "a", "b"],
            ["RPUSH", "l", "p", "q"],
            ["LRANGE", "l", 0, -1],
        ])
        XCTAssertEqual(replies.count, 7)
        XCTAssertEqual(replies[0], .status("OK"))
        XCTAssertEqual(replies[1], .integer(42))
        XCTAssertTrue(replies[2].isError)
        XCTAssertThrowsError(try replies[2].checked())
        XCTAssertEqual(replies[3].string, "42")
        XCTAssertEqual(try replies[3].integerValue(), 42)
        XCTAssertEqual(replies[4], .integer(1))
        XCTAssertEqual(replies[6], .array([.bulk(Array("p".utf8)), .bulk(Array("q".utf8))]))
        XCTAssertEqual(try pool.pipeline([]), [])
    }

    func testLargePipeline() throws {
        let server = try RedisServer.unixSocket()
        let pool = server.pool()
        let n = 20_000
        let sets = try pool.pipeline((0..<n).map { ["SET", .string("key:\($0)"), .integer(Int64($0))] })
        XCTAssertEqual(sets.count, n)
        XCTAssertTrue(sets.allSatisfy { $0 == .status("OK") })
        let gets = try pool.pipeline((0..<n).map { ["GET", .string("key:\($0)")] })
        for (i, r) in gets.enumerated() { XCTAssertEqual(try r.integerValue(), Int64(i)) }
        XCTAssertEqual(try pool.command("DBSIZE"), .integer(Int64(n)))
    }

    func testBinarySafeKeysAndValues() throws {
        let server = try RedisServer.unixSocket()
        let pool = server.pool()
        let value = (0..<1024).map { UInt8(truncatingIfNeeded: $0) } + Array("\r\n$3\r\n*1\r\n".utf8)
        let key: [UInt8] = [0, 1, 13, 10, 255, 58]
        XCTAssertEqual(try pool.command(["SET", .bytes(key), .bytes(value)]), .status("OK"))
        XCTAssertEqual(try pool.command(["GET", .bytes(key)]), .bulk(value))
        XCTAssertEqual(try pool.command(["STRLEN", .bytes(key)]), .integer(Int64(value.count)))
        XCTAssertEqual(try pool.command(["SET", "empty", .bytes([])]), .status("OK"))
        XCTAssertEqual(try pool.command(["GET", "empty"]), .bulk([]))
        XCTAssertEqual(try pool.command(["SET", "data", RedisArgument(Data([0, 0, 7]))]), .status("OK"))
        XCTAssertEqual(try pool.command(["GET", "data"]).bytes, [0, 0, 7])
        XCTAssertEqual(try pool.command(["SET", "neg", .integer(-1234567890123)]), .status("OK"))
        XCTAssertEqual(try pool.command(["GET", "neg"]).string, "-1234567890123")
    }

    func testAuth() throws {
        let server = try RedisServer.tcp(password: "s3cret pass")
        XCTAssertNoThrow(try server.pool().ping())
        // No password: connecting works, commands are refused.
        let anonymous = RedisPool(server.config(password: .some(nil)))
        let reply = try anonymous.command("GET", "x")
        guard case .error(let m) = reply else { return XCTFail("expected NOAUTH, got \(reply)") }
        XCTAssertTrue(m.contains("NOAUTH"), m)
        // Wrong password: the connection fails.
        let wrong = RedisPool(server.config(password: "nope"))
        XCTAssertThrowsError(try wrong.ping()) { error in
            guard case RedisError.connectionFailed(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("AUTH"), m)
            XCTAssertFalse(m.contains("nope"), "the password must not appear in errors")
        }
    }

    func testAuthOverUnixSocket() throws {
        let server = try RedisServer.unixSocket(password: "pw")
        try server.pool().ping()
        XCTAssertThrowsError(try RedisPool(server.config(password: "bad")).ping())
    }

    func testDatabaseNumber() throws {
        let server = try RedisServer.unixSocket()
        let db3 = server.pool(db: 3)
        let db0 = server.pool()
        try db3.command("SET", "only-in-3", "yes").checked()
        XCTAssertEqual(try db3.command("GET", "only-in-3").string, "yes")
        XCTAssertEqual(try db0.command("GET", "only-in-3"), .null)
        XCTAssertEqual(try db0.command("DBSIZE"), .integer(0))
        XCTAssertEqual(try db3.command("DBSIZE"), .integer(1))
        XCTAssertEqual(db3.config.endpoint, "unix:\(server.socketPath!)/3")
        XCTAssertThrowsError(try server.pool(db: 99_999).ping())  // SELECT out of range fails the connect
    }

    func testDeadRedisIsAThrownError() throws {
        let server = try RedisServer.unixSocket()
        let pool = RedisPool(server.config(commandTimeout: 0.5, connectTimeout: 0.5))
        try pool.ping()
        server.stop()
        // The idle connection is closed: the next call must reconnect, fail, and throw.
        XCTAssertThrowsError(try pool.command("GET", "x"))
        // During back-off calls fail at once, still as errors.
        XCTAssertThrowsError(try pool.command("GET", "x")) { error in
            XCTAssertTrue(error is RedisError, "\(error)")
        }
        XCTAssertThrowsError(try pool.pipeline([["GET", "x"], ["GET", "y"]]))
        let tcp = RedisPool(RedisConfig(port: try RedisServer.freePort(), connectTimeout: 0.5, commandTimeout: 0.5))
        XCTAssertThrowsError(try tcp.ping()) { error in
            guard case RedisError.connectionFailed = error else { return XCTFail("\(error)") }
        }
    }

    func testHungRedisTimesOut() throws {
        let server = try RedisServer.unixSocket()
        let pool = RedisPool(server.config(commandTimeout: 0.3, connectTimeout: 0.3))
        try pool.command("SET", "k", "v").checked()
        server.pause()
        defer { server.resume() }
        XCTAssertThrowsError(try pool.command("GET", "k")) { error in
            guard case RedisError.io(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("timed out"), m)
        }
        XCTAssertEqual(pool.openConnections, 0, "the timed-out connection is dropped")
        server.resume()
        XCTAssertEqual(try eventually { try pool.command("GET", "k") }.string, "v")
    }

    func testReconnectsAfterRestart() throws {
        for server in [try RedisServer.unixSocket(), try RedisServer.tcp()] {
            let pool = server.pool()
            try pool.command("SET", "k", "before").checked()
            try server.restart()
            // The server lost its data (no persistence): the new connection sees an empty db.
            XCTAssertEqual(try eventually { try pool.command("GET", "k") }, .null)
            try pool.command("SET", "k", "after").checked()
            XCTAssertEqual(try pool.command("GET", "k").string, "after")
        }
    }

    func testPoolIsBoundedAndThreadSafe() throws {
        let server = try RedisServer.unixSocket()
        let pool = RedisPool(RedisConfig(unixSocket: server.socketPath, maxConnections: 3))
        let errors = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            for _ in 0..<200 {
                do {
                    _ = try pool.pipeline([["INCR", "counter"], ["INCR", "other"]])
                } catch {
                    errors.withLock { $0.append("\(error)") }
                }
            }
        }
        XCTAssertEqual(errors.withLock { $0 }, [])
        XCTAssertEqual(try pool.command("GET", "counter").integerValue(), 1600)
        XCTAssertLessThanOrEqual(pool.openConnections, 3)
        XCTAssertGreaterThan(pool.openConnections, 0)
        pool.close()
        XCTAssertEqual(pool.openConnections, 0)
        XCTAssertThrowsError(try pool.ping())
    }
}

/// Retries `body` (up to ~5 s) until it stops throwing, for reconnect tests.
func eventually<T>(_ body: () throws -> T) throws -> T {
    var last: Error?
    for _ in 0..<100 {
        do { return try body() } catch {
            last = error
            usleep(50_000)
        }
    }
    throw last!
}
