import Foundation
import Redis
import Synchronization
import TestSupport
import XCTest

/// The pool against Redis as operators run it: a master, a replica and a
/// sentinel (real redis-server and redis-sentinel processes on loopback),
/// failovers requested and forced by killing the master, servers restarted
/// under a plain host/port configuration, and DNS SRV records served by a
/// real dnsmasq.
final class RedisSentinelTests: XCTestCase {
    // MARK: - Discovery

    func testDiscoveryThroughTheSentinelWritesAndReads() throws {
        let cluster = try RedisSentinelCluster()
        let masterPort = cluster.servers[0].port!
        let replicaPort = cluster.servers[1].port!
        let pool = RedisPool(cluster.config())
        XCTAssertEqual(pool.config.endpoint, "sentinel:casfs@127.0.0.1:\(cluster.sentinelPort)")
        try pool.command("SET", "k", "v").checked()
        XCTAssertEqual(try pool.command("GET", "k").string, "v")
        XCTAssertEqual(try pool.command("CONFIG", "GET", "port"), .array([.bulk(Array("port".utf8)), .bulk(Array(String(masterPort).utf8))]),
                       "the pool talks to the master")
        XCTAssertEqual(try direct(masterPort).command("GET", "k").string, "v")

        // A durable write is on the replica as soon as it is acknowledged.
        for i in 0..<20 {
            XCTAssertEqual(try pool.command(["SET", .string("d\(i)"), .integer(Int64(i))], durable: true), .status("OK"))
            XCTAssertEqual(try direct(replicaPort).command("GET", "d\(i)").string, String(i), "d\(i) on the replica")
        }
        let streamed = try pool.pipeline(count: 100, durable: true) { batch, i in
            batch.append(["SET", .string("s\(i)"), "x"])
        }
        XCTAssertEqual(streamed.count, 100, "the WAIT reply is not returned")
        XCTAssertEqual(try direct(replicaPort).command("EXISTS", "s0", "s99"), .integer(2))

        // Sentinels are tried in turn: a dead one first does not matter.
        var config = cluster.config()
        config.sentinels = [RedisHostPort(host: "127.0.0.1", port: try RedisServer.freePort()), cluster.sentinelAddress]
        XCTAssertEqual(try RedisPool(config).command("GET", "k").string, "v")

        // An unknown master name is an error, not a hang.
        var unknown = cluster.config(retries: 1)
        unknown.sentinelMasterName = "nobody"
        XCTAssertThrowsError(try RedisPool(unknown).ping()) { error in
            guard case RedisError.connectionFailed(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("nobody"), m)
        }
    }

    func testReadsGoToAReplicaOnlyWhenAskedAndAllowed() throws {
        let cluster = try RedisSentinelCluster()
        let replicas = RedisPool(cluster.config(readFromReplicas: true))
        let masterOnly = RedisPool(cluster.config())
        XCTAssertEqual(try replicas.command(["ROLE"], readOnly: true).role, "slave")
        XCTAssertEqual(try replicas.command(["ROLE"]).role, "master")
        XCTAssertEqual(try replicas.command(["ROLE"], durable: true, readOnly: true).role, "master")
        XCTAssertEqual(try masterOnly.command(["ROLE"], readOnly: true).role, "master")

        // With the replica gone, reads fall back to the master.
        cluster.servers[1].stop()
        let role = try eventually(limit: 30) { () throws -> String in
            let r = try replicas.command(["ROLE"], readOnly: true).role
            guard r == "master" else { throw TestSupportError("still \(r ?? "?")") }
            return r!
        }
        XCTAssertEqual(role, "master")
    }

    // MARK: - Failover

    func testRequestedFailoverKeepsWritesAndTheFirstWriteAfterItSucceeds() throws {
        let cluster = try RedisSentinelCluster()
        let oldMaster = cluster.servers[0].port!
        let newMaster = cluster.servers[1].port!
        // `idle` keeps a connection to the old master through the failover.
        let idle = RedisPool(cluster.config())
        for i in 0..<200 {
            XCTAssertEqual(try idle.command(["SET", .string("before:\(i)"), .integer(Int64(i))], durable: true), .status("OK"))
        }
        XCTAssertEqual(idle.openConnections, 1)

        // Another pool writes durably all along.
        let writer = Writer(pool: RedisPool(cluster.config()), prefix: "during")
        writer.start()
        try RedisSentinelCluster.poll("the writer to start") { writer.acknowledged.count >= 20 }

        try cluster.failover()
        try cluster.waitForMaster(port: newMaster)
        XCTAssertEqual(try RedisSentinelCluster.info(oldMaster)["role"], "slave")

        // The old master is a replica now (the sentinel closed its clients when
        // it converted it): the first write goes to the new master at once.
        XCTAssertEqual(try idle.command("SET", "after", "1"), .status("OK"))
        XCTAssertEqual(try idle.command(["SET", "after-durable", "1"], durable: true), .status("OK"))
        XCTAssertEqual(try direct(newMaster).command("GET", "after").string, "1")
        XCTAssertEqual(try direct(oldMaster).command("GET", "after-durable").string, "1", "acknowledged by the new replica")

        let seen = writer.acknowledged.count
        try RedisSentinelCluster.poll("the writer to go on after the failover") { writer.acknowledged.count >= seen + 20 }
        let result = try writer.stop()
        XCTAssertTrue(result.errors.allSatisfy { $0 is RedisError }, "\(result.errors.prefix(3))")

        let master = direct(newMaster)
        for i in 0..<200 {
            XCTAssertEqual(try master.command("GET", "before:\(i)").string, String(i), "before:\(i) lost")
        }
        try assertAllPresent(result.acknowledged, on: master)
    }

    func testAMasterDemotedUnderAnOpenConnectionAnswersReadOnlyAndTheWriteGoesToTheNewMaster() throws {
        // The sentinel closes the clients of a master it demotes; an operator
        // (or another tool) may not. Swap the roles by hand, keeping the
        // pool's connection to the old master open, and tell the sentinel.
        let cluster = try RedisSentinelCluster()
        let oldMaster = cluster.servers[0].port!
        let newMaster = cluster.servers[1].port!
        let pool = RedisPool(cluster.config())
        XCTAssertEqual(try pool.command(["SET", "before", "1"], durable: true), .status("OK"))
        XCTAssertEqual(pool.openConnections, 1)
        try direct(newMaster).command("REPLICAOF", "NO", "ONE").checked()
        try direct(oldMaster).command("REPLICAOF", "127.0.0.1", String(newMaster)).checked()
        XCTAssertEqual(try cluster.sentinelCommand(["SENTINEL", "REMOVE", .string(RedisSentinelCluster.masterName)]), .status("OK"))
        XCTAssertEqual(try cluster.sentinelCommand([
            "SENTINEL", "MONITOR", .string(RedisSentinelCluster.masterName), "127.0.0.1", .integer(Int64(newMaster)), 1,
        ]), .status("OK"))
        // The idle connection is still open, to a replica now.
        let refused = try direct(oldMaster).command("SET", "x", "1")
        guard case .error(let m) = refused, m.hasPrefix("READONLY") else { return XCTFail("\(refused)") }
        XCTAssertEqual(try pool.command("SET", "after", "1"), .status("OK"))
        XCTAssertEqual(try direct(newMaster).command("GET", "after").string, "1")
        XCTAssertEqual(try direct(newMaster).command("GET", "before").string, "1")
        XCTAssertEqual(pool.openConnections, 1, "the connection to the old master was dropped")
    }

    func testKilledMasterFailsSomeCallsThenWritesGoOnWithoutLosingAcknowledgedOnes() throws {
        let cluster = try RedisSentinelCluster()
        let replica = cluster.servers[1].port!
        let writer = Writer(pool: RedisPool(cluster.config(commandTimeout: 1, connectTimeout: 1)), prefix: "k")
        writer.start()
        try RedisSentinelCluster.poll("the writer to start") { writer.acknowledged.count >= 50 }

        cluster.servers[0].stop()  // SIGKILL
        let killedAt = writer.acknowledged.count
        try RedisSentinelCluster.poll("some writes to fail") { !writer.errors.isEmpty }
        try RedisSentinelCluster.poll("the writer to go on", limit: 90) {
            writer.acknowledged.count >= killedAt + 50 && writer.errors.count == writer.errorsBefore(lastAcknowledgements: 50)
        }
        let result = try writer.stop()
        XCTAssertGreaterThan(result.errors.count, 0, "writes during the failover window fail")
        for e in result.errors {
            XCTAssertTrue(e is RedisError, "\(e)")
        }
        XCTAssertEqual(try cluster.masterPort(), replica, "the replica was promoted")
        try assertAllPresent(result.acknowledged, on: direct(replica))
    }

    // MARK: - Durable writes

    func testDurableWritesWhileTheReplicaIsDown() throws {
        let cluster = try RedisSentinelCluster()
        let replica = cluster.servers[1]
        let lenient = RedisPool(cluster.config())
        let strict = RedisPool(cluster.config(durableShortfall: .fail))
        XCTAssertEqual(try strict.command(["SET", "a", "1"], durable: true), .status("OK"))

        replica.stop()
        try RedisSentinelCluster.poll("the sentinel to see the replica down") {
            !(try cluster.replicaFlags(port: replica.port!)).isDisjoint(with: ["disconnected", "s_down"])
        }
        // The replica is down, so it cannot be promoted: the default accepts
        // what the master alone acknowledged; `.fail` refuses it.
        XCTAssertEqual(try lenient.command(["SET", "b", "1"], durable: true), .status("OK"))
        XCTAssertEqual(try lenient.command(["SET", "c", "1"], durable: true), .status("OK"))
        XCTAssertThrowsError(try strict.command(["SET", "d", "1"], durable: true)) { error in
            guard case RedisError.notDurable(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("0 of 1"), m)
        }
        XCTAssertEqual(try strict.command(["SET", "e", "1"]), .status("OK"), "writes that are not durable go on")

        // Back, the replica acknowledges again: a durable write is on it at once.
        try replica.start()
        try cluster.waitForMaster(port: cluster.servers[0].port!)
        try RedisSentinelCluster.poll("durable writes to wait for the replica again") {
            try lenient.command(["SET", "f", "2"], durable: true).checked()
            return try direct(replica.port!).command("GET", "f").string == "2"
                && (try? strict.command(["SET", "g", "1"], durable: true)) == .status("OK")
        }
    }

    func testDurableWriteFailsWhenALiveReplicaDoesNotAcknowledge() throws {
        // The sentinel takes a minute to call a silent replica down, so a
        // frozen replica counts as up: it could be promoted without the write.
        let cluster = try RedisSentinelCluster(downAfterMilliseconds: 60_000)
        let pool = RedisPool(cluster.config(durableTimeout: 0.3))
        XCTAssertEqual(try pool.command(["SET", "a", "1"], durable: true), .status("OK"))
        cluster.servers[1].pause()
        defer { cluster.servers[1].resume() }
        XCTAssertThrowsError(try pool.command(["SET", "b", "1"], durable: true)) { error in
            guard case RedisError.notDurable(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("1 up"), m)
        }
        XCTAssertEqual(try pool.command("GET", "b").string, "1", "the master has the write; only its acknowledgement failed")
        let accepting = RedisPool(cluster.config(durableTimeout: 0.3, durableShortfall: .accept))
        XCTAssertEqual(try accepting.command(["SET", "c", "1"], durable: true), .status("OK"))
    }

    func testDurableWithoutSentinelUsesTheConfiguredReplicaCount() throws {
        let master = try RedisServer.tcp(arguments: ["--repl-diskless-sync-delay", "0"])
        let replica = try RedisServer.tcp(arguments: ["--replicaof", "127.0.0.1", String(master.port!)])
        try RedisSentinelCluster.waitForReplication(master: master.port!, replicas: [replica.port!])
        // Without sentinels no replica is waited for unless configured.
        XCTAssertEqual(master.pool().config.durableReplicas, nil)
        XCTAssertEqual(try master.pool().command(["SET", "plain", "1"], durable: true), .status("OK"))
        var c = master.config()
        c.durableReplicas = 1
        let pool = RedisPool(c)
        XCTAssertEqual(try pool.command(["SET", "a", "1"], durable: true), .status("OK"))
        XCTAssertEqual(try replica.pool().command("GET", "a").string, "1")
        // A replica that is gone is not connected to the master: accepted.
        replica.stop()
        try RedisSentinelCluster.poll("the master to lose its replica") {
            try RedisSentinelCluster.info(master.port!)["connected_slaves"] == "0"
        }
        XCTAssertEqual(try pool.command(["SET", "b", "1"], durable: true), .status("OK"))
        c.durableShortfall = .fail
        XCTAssertThrowsError(try RedisPool(c).command(["SET", "c", "1"], durable: true))
    }

    // MARK: - Plain host and port

    func testRetriesRideOutARestartedServer() throws {
        let server = try RedisServer.tcp()
        var c = server.config(commandTimeout: 1, connectTimeout: 0.5)
        // Up to 400 retries of 100–200 ms each: long enough for any restart.
        c.retries = 400
        c.retryBackoffBase = 0.1
        c.retryBackoffCap = 0.2
        let pool = RedisPool(c)
        try pool.command("SET", "k", "before").checked()
        server.stop()
        let restarted = DispatchSemaphore(value: 0)
        let restartError = ErrorBox()
        Thread.detachNewThread {
            usleep(300_000)
            do { try server.start() } catch { restartError.error = error }
            restarted.signal()
        }
        // This call starts while the server is down and succeeds once it is back.
        XCTAssertEqual(try pool.command("SET", "k", "after"), .status("OK"))
        restarted.wait()
        XCTAssertNil(restartError.error)
        XCTAssertEqual(try pool.command("GET", "k").string, "after")

        // Without retries, the same outage is an error at once.
        var none = server.config(commandTimeout: 1, connectTimeout: 0.5)
        none.retries = 0
        let noRetries = RedisPool(none)
        try noRetries.ping()
        server.stop()
        XCTAssertThrowsError(try noRetries.ping())
    }

    func testWritesResumeAfterARestartMidLoop() throws {
        let server = try RedisServer.tcp()
        let writer = Writer(pool: RedisPool(server.config(commandTimeout: 1, connectTimeout: 0.5)), prefix: "k", durable: false)
        writer.start()
        try RedisSentinelCluster.poll("the writer to start") { writer.acknowledged.count >= 50 }
        try server.restart()
        let restartedAt = writer.acknowledged.count
        try RedisSentinelCluster.poll("writes to resume") { writer.acknowledged.count >= restartedAt + 100 }
        let result = try writer.stop()
        XCTAssertTrue(result.errors.allSatisfy { $0 is RedisError }, "\(result.errors.prefix(3))")
        // The server kept nothing from before the restart; what came after is there.
        let last = result.acknowledged.suffix(50)
        try assertAllPresent(Array(last), on: direct(server.port!))
    }

    // MARK: - DNS SRV

    func testSRVRecordNamesTheServer() throws {
        let server = try RedisServer.tcp()
        let dns = try DNSServer(srv: [("_redis._tcp.casfs.test", "127.0.0.1", server.port!)])
        let records = try DNSSRVResolver(servers: [dns.address]).lookup("_redis._tcp.casfs.test")
        XCTAssertEqual(records, [DNSSRVRecord(priority: 0, weight: 0, port: UInt16(server.port!), target: "127.0.0.1")])
        XCTAssertThrowsError(try DNSSRVResolver(servers: [dns.address], timeout: 0.5).lookup("_none._tcp.casfs.test"))

        let config = RedisConfig(
            host: "ignored.invalid", port: 1, connectTimeout: 1, commandTimeout: 2,
            dnsSRVRecord: "_redis._tcp.casfs.test", dnsServers: [dns.address])
        XCTAssertEqual(config.endpoint, "srv:_redis._tcp.casfs.test")
        let pool = RedisPool(config)
        try pool.command("SET", "via-srv", "1").checked()
        XCTAssertEqual(try direct(server.port!).command("GET", "via-srv").string, "1")
    }

    func testSRVRecordNamesTheSentinels() throws {
        let cluster = try RedisSentinelCluster()
        let dead = try RedisServer.freePort()
        let dns = try DNSServer(srv: [
            ("_sentinel._tcp.casfs.test", "127.0.0.1", dead),
            ("_sentinel._tcp.casfs.test", "127.0.0.1", cluster.sentinelPort),
        ])
        XCTAssertEqual(Set(try DNSSRVResolver(servers: [dns.address]).lookup("_sentinel._tcp.casfs.test").map(\.port)),
                       [UInt16(dead), UInt16(cluster.sentinelPort)])
        var config = cluster.config()
        config.host = "ignored.invalid"
        config.dnsSRVRecord = "_sentinel._tcp.casfs.test"
        config.dnsServers = [dns.address]
        let pool = RedisPool(config)
        try pool.command("SET", "via-srv", "1").checked()
        XCTAssertEqual(try direct(cluster.servers[0].port!).command("GET", "via-srv").string, "1")
    }

    func testSRVAnswerParsing() throws {
        // dnsmasq's answer to an SRV query with two records (captured).
        let captured = hex(
            "123485800001000200000000065f7265646973045f74637005636173667304746573740000210001c00c00210001"
                + "0000000000110001000018ed096c6f63616c686f737400c00c002100010000000000110000000018ec033132370130013001310"
                + "0")
        XCTAssertEqual(try DNSSRVMessage.records(in: captured, id: 0x1234), [
            DNSSRVRecord(priority: 1, weight: 0, port: 6381, target: "localhost"),
            DNSSRVRecord(priority: 0, weight: 0, port: 6380, target: "127.0.0.1"),
        ])
        XCTAssertThrowsError(try DNSSRVMessage.records(in: captured, id: 0x4321), "another id")
        // Every truncation and every single-byte change either parses or throws; none traps.
        for n in 0..<captured.count {
            _ = try? DNSSRVMessage.records(in: Array(captured.prefix(n)), id: 0x1234)
        }
        for i in captured.indices {
            for v: UInt8 in [0, 0x3F, 0xC0, 0xFF] {
                var m = captured
                m[i] = v
                _ = try? DNSSRVMessage.records(in: m, id: 0x1234)
            }
        }
        // A target that is a pointer to itself is an error.
        let looping: [UInt8] = [
            0x12, 0x34, 0x81, 0x80, 0, 0, 0, 1, 0, 0, 0, 0,  // header: an answer, no question, one record
            0, 0, 33, 0, 1, 0, 0, 0, 0, 0, 8,  // root name, SRV, IN, TTL 0, 8 bytes of data
            0, 0, 0, 0, 0, 1, 0xC0, 29,  // priority, weight, port 1, target: pointer to offset 29 (itself)
        ]
        XCTAssertThrowsError(try DNSSRVMessage.records(in: looping, id: 0x1234)) { error in
            XCTAssertTrue("\(error)".contains("loop"), "\(error)")
        }
        var selfContained = looping
        selfContained[29...] = [0]
        selfContained[22] = 7
        XCTAssertEqual(try DNSSRVMessage.records(in: selfContained, id: 0x1234), [], "a root target means no service")
        // The query names the record as given, with an OPT record.
        let q = try DNSSRVMessage.query(name: "_redis._tcp.casfs.test.", id: 7)
        XCTAssertEqual(Array(q.prefix(12)), [0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1])
        XCTAssertThrowsError(try DNSSRVMessage.query(name: "a..b", id: 1))
        XCTAssertThrowsError(try DNSSRVMessage.query(name: String(repeating: "x", count: 64), id: 1))
    }

    func testHostPortParsing() {
        XCTAssertEqual(RedisHostPort(parsing: "redis:6380"), RedisHostPort(host: "redis", port: 6380))
        XCTAssertEqual(RedisHostPort(parsing: "[::1]:26379"), RedisHostPort(host: "::1", port: 26379))
        XCTAssertEqual(RedisHostPort(parsing: "redis", defaultPort: 26379), RedisHostPort(host: "redis", port: 26379))
        XCTAssertNil(RedisHostPort(parsing: "redis"))
        XCTAssertNil(RedisHostPort(parsing: "redis:0"))
        XCTAssertNil(RedisHostPort(parsing: "redis:99999999999999999999"))
        XCTAssertNil(RedisHostPort(parsing: ":6379"))
    }

    // MARK: - Helpers

    private func direct(_ port: Int) -> RedisPool {
        RedisPool(RedisConfig(port: port, connectTimeout: 1, commandTimeout: 2, maxConnections: 1, retries: 0))
    }

    private func assertAllPresent(_ keys: [String], on pool: RedisPool, file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertFalse(keys.isEmpty, file: file, line: line)
        var missing: [String] = []
        for chunk in stride(from: 0, to: keys.count, by: 500) {
            let part = Array(keys[chunk..<min(keys.count, chunk + 500)])
            let replies = try pool.pipeline(part.map { ["EXISTS", .string($0)] })
            for (k, r) in zip(part, replies) where r != .integer(1) { missing.append(k) }
        }
        XCTAssertEqual(missing, [], "\(missing.count) of \(keys.count) acknowledged keys are missing", file: file, line: line)
    }

    private func hex(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        var i = s.startIndex
        while i < s.endIndex {
            let j = s.index(i, offsetBy: 2)
            out.append(UInt8(s[i..<j], radix: 16)!)
            i = j
        }
        return out
    }
}

/// Writes `<prefix>:<n>` keys in a loop on its own thread (durably unless
/// told otherwise) and records which were acknowledged and which failed.
final class Writer: @unchecked Sendable {
    let pool: RedisPool
    let prefix: String
    let durable: Bool
    private let state = Mutex(State())
    private let finished = DispatchSemaphore(value: 0)

    struct State {
        var acknowledged: [String] = []
        var errors: [Error] = []
        /// For each error, how many keys were acknowledged before it.
        var errorPositions: [Int] = []
        var stop = false
    }

    init(pool: RedisPool, prefix: String, durable: Bool = true) {
        self.pool = pool
        self.prefix = prefix
        self.durable = durable
    }

    var acknowledged: [String] { state.withLock { $0.acknowledged } }
    var errors: [Error] { state.withLock { $0.errors } }

    /// Errors that came before the last `n` acknowledgements.
    func errorsBefore(lastAcknowledgements n: Int) -> Int {
        state.withLock { s in s.errorPositions.filter { $0 <= s.acknowledged.count - n }.count }
    }

    func start() {
        Thread.detachNewThread { [self] in
            var i = 0
            while !state.withLock({ $0.stop }) {
                let key = "\(prefix):\(i)"
                i += 1
                do {
                    let r = try pool.command(["SET", .string(key), .integer(Int64(i))], durable: durable)
                    guard r == .status("OK") else { throw TestSupportError("SET answered \(r)") }
                    state.withLock { $0.acknowledged.append(key) }
                } catch {
                    state.withLock {
                        $0.errors.append(error)
                        $0.errorPositions.append($0.acknowledged.count)
                    }
                    usleep(20_000)
                }
            }
            finished.signal()
        }
    }

    /// Stops the loop; throws if the call in progress does not return within
    /// two minutes (a hang).
    func stop() throws -> (acknowledged: [String], errors: [Error]) {
        state.withLock { $0.stop = true }
        guard finished.wait(timeout: .now() + 120) == .success else { throw TestSupportError("the writer hung") }
        return state.withLock { ($0.acknowledged, $0.errors) }
    }
}

/// An error handed from one thread to another (written before a semaphore is signalled, read after the wait).
final class ErrorBox: @unchecked Sendable {
    var error: Error?
}

extension RedisReply {
    /// The first element of a ROLE reply.
    var role: String? {
        guard case .array(let parts) = self else { return nil }
        return parts.first?.string
    }
}

/// Retries `body` every 100 ms until it stops throwing, for up to `limit` seconds.
func eventually<T>(limit: Double, _ body: () throws -> T) throws -> T {
    let deadline = Date().addingTimeInterval(limit)
    while true {
        do { return try body() } catch {
            if Date() > deadline { throw error }
            usleep(100_000)
        }
    }
}
