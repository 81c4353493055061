import Dispatch
import Foundation
import Logging
import Synchronization

private let log = Logger(label: "casfs.redis")

/// A bounded pool of Redis connections. Each call checks one connection out,
/// uses it alone, and returns it; a connection that broke is dropped.
///
/// Where connections go is `RedisTopology`'s business (a fixed address, a DNS
/// SRV record, or the master Redis Sentinel names, checked with `ROLE`).
/// A call that fails with a connection error, a timeout, a LOADING reply or,
/// with sentinels, a READONLY reply (an old master now a replica) is sent
/// again, up to `retries` times, after BuildGrid's back-off: before each
/// retry the idle connections are dropped and the address is looked up
/// anew, so the first write after a failover goes to the new master. The
/// failure is logged once per change of connections, not once per call.
/// When a connect fails, further connects are held back with exponential
/// back-off; retrying callers wait for it, others get an error at once.
public final class RedisPool: Sendable {
    public let config: RedisConfig
    private let slots: DispatchSemaphore
    private let state: Mutex<State>
    private let topology: RedisTopology
    private let retry: RedisRetryPolicy
    private let durability: RedisDurability

    /// Connections to the master (or the only server), or to a replica for reads.
    enum Lane: Int { case master = 0, replica = 1 }

    private struct Pooled: @unchecked Sendable {
        let conn: RedisConnection
        let lane: Lane
        /// The lane's generation when it was made; older ones are dropped.
        let generation: UInt64
    }

    private struct LaneState {
        var idle: [Pooled] = []
        /// Raised after every failure that is retried: connections of older
        /// generations (maybe to an old master) are not used again.
        var generation: UInt64 = 0
        var backoff: Double = 0
        var retryAt: UInt64 = 0
        var lastError = ""
        /// A connection of this lane failed, broke or was found closed: the
        /// next one made is a reconnect.
        var lost = false
    }

    private struct State {
        var lanes = [LaneState(), LaneState()]
        var open = 0
        var closed = false
        var statistics = Statistics()
    }

    /// What the pool met since it was made, for metrics.
    public struct Statistics: Sendable, Equatable {
        /// Attempts that failed: connections not made, broken or timed out,
        /// replies that call for a retry (LOADING, READONLY), too few
        /// replicas acknowledging, no connection free. A call retried
        /// three times that never succeeds counts four.
        public var failures: Int64 = 0
        /// Attempts made again after a failure.
        public var retries: Int64 = 0
        /// Connections made after one of the same lane failed, broke or was
        /// found closed by the server.
        public var reconnects: Int64 = 0

        public init() {}
    }

    /// The counts so far.
    public var statistics: Statistics { state.withLock { $0.statistics } }

    /// A failed attempt: the error, whether to retry, and not before when.
    private struct Failure: Error {
        let error: RedisError
        let retriable: Bool
        var notBefore: UInt64 = 0
    }

    /// Connections are made lazily, on first use.
    public init(_ config: RedisConfig) {
        precondition(config.maxConnections > 0, "maxConnections must be positive")
        self.config = config
        self.slots = DispatchSemaphore(value: config.maxConnections)
        self.state = Mutex(State())
        self.topology = RedisTopology(config)
        self.retry = RedisRetryPolicy(config)
        self.durability = RedisDurability(config, topology: topology)
    }

    /// Closes idle connections; later calls fail.
    public func close() {
        let idle = state.withLock { s -> [Pooled] in
            s.closed = true
            let i = s.lanes.flatMap(\.idle)
            for l in s.lanes.indices { s.lanes[l].idle = [] }
            s.open -= i.count
            return i
        }
        _ = idle  // freed here, outside the lock
    }

    /// Connections open now (idle and checked out).
    public var openConnections: Int { state.withLock { $0.open } }

    /// Runs one command. `durable`: see `pipeline(_:durable:readOnly:)`.
    public func command(_ args: [RedisArgument], durable: Bool = false, readOnly: Bool = false) throws -> RedisReply {
        try pipeline([args], durable: durable, readOnly: readOnly)[0]
    }

    /// Runs one command given as strings.
    public func command(_ args: String...) throws -> RedisReply {
        try pipeline([args.map { .string($0) }])[0]
    }

    /// Sends all commands in one batch over one connection and returns one reply
    /// per command, in order. Error replies are returned, not thrown; a broken
    /// connection or timeout throws (after the configured retries).
    ///
    /// `durable`: the batch ends with `WAIT` for the configured number of
    /// replicas (see `RedisDurability`), so that what it wrote survives a
    /// failover; it throws `RedisError.notDurable` when too few acknowledged
    /// and the policy does not accept that. Nothing is added when no replica
    /// is wanted (no sentinel and `durableReplicas` unset).
    ///
    /// `readOnly`: the batch only reads, and may go to a replica when
    /// `readFromReplicas` is set (with sentinels); replicas may lag behind.
    public func pipeline(_ commands: [[RedisArgument]], durable: Bool = false, readOnly: Bool = false) throws -> [RedisReply] {
        if commands.isEmpty { return [] }
        return try run(lane(durable, readOnly), durable: durable) { conn, wait in
            try conn.pipeline(wait.map { commands + [$0] } ?? commands)
        }
    }

    /// Sends an encoded batch over one connection; one reply per command, in order.
    public func pipeline(_ batch: RedisCommands, durable: Bool = false, readOnly: Bool = false) throws -> [RedisReply] {
        if batch.count == 0 { return [] }
        return try run(lane(durable, readOnly), durable: durable) { conn, wait in
            guard let wait else { return try conn.pipeline(batch) }
            var b = batch
            b.append(wait)
            return try conn.pipeline(b)
        }
    }

    /// Streams `count` commands over one connection: `encode` appends command
    /// `i` (exactly one) to the batch it is given; commands are sent in chunks
    /// as they are encoded, so the server starts before the last is encoded.
    /// One reply per command, in order. A retry encodes them all again.
    public func pipeline(
        count: Int, durable: Bool = false, readOnly: Bool = false, encode: (inout RedisCommands, Int) -> Void
    ) throws -> [RedisReply] {
        if count <= 0 { return [] }
        return try run(lane(durable, readOnly), durable: durable) { conn, wait in
            guard let wait else { return try conn.pipeline(count: count, encode: encode) }
            return try conn.pipeline(count: count + 1) { batch, i in
                if i < count { encode(&batch, i) } else { batch.append(wait) }
            }
        }
    }

    /// Sends PING; throws unless the answer is PONG.
    public func ping() throws {
        let r = try command("PING")
        guard r.string == "PONG" else { throw RedisError.unexpectedReply("PING answered \(r)") }
    }

    private func lane(_ durable: Bool, _ readOnly: Bool) -> Lane {
        readOnly && !durable && config.readFromReplicas && config.usesSentinel ? .replica : .master
    }

    // MARK: - Retries

    /// Runs `send` on a connection of `lane`, retrying as configured.
    /// `send` gets the WAIT command to append, for durable pipelines.
    private func run(
        _ lane: Lane, durable: Bool, _ send: (RedisConnection, [RedisArgument]?) throws -> [RedisReply]
    ) throws -> [RedisReply] {
        var retries = 0
        var first: RedisError?
        while true {
            do {
                return try attempt(lane, durable: durable, send)
            } catch let f as Failure {
                let retrying = f.retriable && retries < retry.retries
                state.withLock { s in
                    s.statistics.failures &+= 1
                    if retrying { s.statistics.retries &+= 1 }
                }
                guard retrying else {
                    guard let first else { throw f.error }
                    let also = first == f.error ? "" : "; first failure: \(first)"
                    throw f.error.adding("after \(retries) retries\(also)")
                }
                retries += 1
                if first == nil { first = f.error }
                var delay = retry.delay(beforeRetry: retries)
                let now = DispatchTime.now().uptimeNanoseconds
                if f.notBefore > now { delay = max(delay, Double(f.notBefore - now) / 1e9) }
                log.debug("retry \(retries) of \(retry.retries) in \(Int(delay * 1000)) ms after: \(f.error)")
                if delay > 0 { usleep(UInt32(min(delay, 60) * 1e6)) }
            }
        }
    }

    /// One try: check a connection out, send, judge the replies.
    private func attempt(
        _ wanted: Lane, durable: Bool, _ send: (RedisConnection, [RedisArgument]?) throws -> [RedisReply]
    ) throws -> [RedisReply] {
        let wait = config.connectTimeout + config.commandTimeout
        guard slots.wait(timeout: .now() + wait) == .success else {
            throw Failure(error: .unavailable("\(config.endpoint): no connection free after \(wait) s (\(config.maxConnections) in use)"), retriable: false)
        }
        defer { slots.signal() }
        let p = try checkOut(wanted)
        let waitFor = durable ? durability.replicasToWaitFor(p.conn) : 0
        var replies: [RedisReply]
        do {
            if waitFor > 0 {
                replies = try p.conn.withLongerTimeout(by: durability.timeoutSeconds) {
                    try send(p.conn, durability.waitCommand(waitFor))
                }
            } else {
                replies = try send(p.conn, nil)
            }
        } catch let e as RedisError {
            let retriable = !p.conn.protocolFailure
            checkIn(p)
            if retriable { reset(p, because: e) }
            throw Failure(error: e, retriable: retriable)
        } catch {
            checkIn(p, drop: true)
            throw error
        }
        if let m = retriableErrorReply(replies) {
            let e = RedisError.server("\(p.conn.endpoint): \(m)")
            checkIn(p, drop: true)
            reset(p, because: e)
            throw Failure(error: e, retriable: true)
        }
        if waitFor > 0, let w = replies.popLast() {
            switch durability.judge(w, waitedFor: waitFor, on: p.conn) {
            case .accepted:
                break
            case .retry(let e):
                checkIn(p, drop: true)
                reset(p, because: e)
                throw Failure(error: e, retriable: true)
            case .fail(let e):
                checkIn(p)
                throw Failure(error: e, retriable: false)
            }
        }
        checkIn(p)
        return replies
    }

    /// The first error reply that calls for a retry: LOADING (a server still
    /// loading its data) and, with sentinels, READONLY (a master demoted).
    private func retriableErrorReply(_ replies: [RedisReply]) -> String? {
        for r in replies {
            guard case .error(let m) = r else { continue }
            if m.hasPrefix("LOADING") || (config.usesSentinel && m.hasPrefix("READONLY")) { return m }
        }
        return nil
    }

    /// After a failure on `p` that is retried: drops the idle connections of
    /// its lane (of the master lane: of both) and looks the address up anew.
    /// Only the first failure of a generation does this, and logs it.
    private func reset(_ p: Pooled, because error: RedisError) {
        let dropped = state.withLock { s -> [Pooled]? in
            guard s.lanes[p.lane.rawValue].generation == p.generation else { return nil }
            var gone: [Pooled] = []
            for l in (p.lane == .master ? [Lane.master, .replica] : [p.lane]) {
                s.lanes[l.rawValue].lost = true
                s.lanes[l.rawValue].generation &+= 1
                gone += s.lanes[l.rawValue].idle
                s.lanes[l.rawValue].idle = []
            }
            s.open -= gone.count
            return gone
        }
        guard let dropped else { return }
        if p.lane == .master { topology.forgetMaster() } else { topology.forgetReplica() }
        log.warning("redis \(p.lane == .master ? "server" : "replica") \(p.conn.endpoint) failed: \(error); reconnecting (\(dropped.count) idle connections dropped)")
    }

    // MARK: - Connections

    private func checkOut(_ wanted: Lane) throws -> Pooled {
        enum Next { case use(Pooled), connect(UInt64), wait(UInt64, String), readFromMaster, fail(String) }
        var lane = wanted
        while true {
            var stale: [Pooled] = []
            let next = state.withLock { s -> Next in
                if s.closed { return .fail("pool closed") }
                let l = lane.rawValue
                while let p = s.lanes[l].idle.popLast() {
                    if p.generation == s.lanes[l].generation && !p.conn.looksClosed { return .use(p) }
                    // Closed by the server (restart, idle timeout) or from before a failure.
                    s.open -= 1
                    s.lanes[l].lost = true
                    stale.append(p)
                }
                let now = DispatchTime.now().uptimeNanoseconds
                if now < s.lanes[l].retryAt {
                    // Reads can always go to the master instead.
                    if lane == .replica { return .readFromMaster }
                    let ms = (s.lanes[l].retryAt - now) / 1_000_000
                    return .wait(s.lanes[l].retryAt, "\(s.lanes[l].lastError); next connect attempt in \(ms) ms")
                }
                s.open += 1
                return .connect(s.lanes[l].generation)
            }
            stale.removeAll()
            switch next {
            case .use(let p):
                return p
            case .readFromMaster:
                lane = .master
            case .fail(let m):
                throw Failure(error: .unavailable("\(config.endpoint): \(m)"), retriable: false)
            case .wait(let until, let m):
                throw Failure(error: .unavailable("\(config.endpoint): \(m)"), retriable: true, notBefore: until)
            case .connect(let generation):
                do {
                    if let p = try connect(lane, generation) { return p }
                    // No replica to read from: use the master.
                    state.withLock { $0.open -= 1 }
                    lane = .master
                } catch {
                    let e = error as? RedisError ?? .connectionFailed("\(error)")
                    let (firstFailure, retryAt) = state.withLock { s -> (Bool, UInt64) in
                        s.open -= 1
                        let l = lane.rawValue
                        s.lanes[l].lastError = "\(e)"
                        s.lanes[l].lost = true
                        // Concurrent connects that fail together back off once.
                        guard DispatchTime.now().uptimeNanoseconds >= s.lanes[l].retryAt else { return (false, s.lanes[l].retryAt) }
                        let b = s.lanes[l].backoff
                        s.lanes[l].backoff = b == 0 ? config.minBackoff : min(config.maxBackoff, b * 2)
                        s.lanes[l].retryAt = DispatchTime.now().uptimeNanoseconds + UInt64(max(0, s.lanes[l].backoff) * 1e9)
                        return (b == 0, s.lanes[l].retryAt)
                    }
                    if firstFailure {
                        log.warning("\(e)")
                    } else {
                        log.debug("\(e)")
                    }
                    // Look the address up again before the next connect.
                    if lane == .master { topology.forgetMaster() } else { topology.forgetReplica() }
                    throw Failure(error: e, retriable: true, notBefore: retryAt)
                }
            }
        }
    }

    /// A new connection for `lane` (nil: no replica, read from the master),
    /// checked with `ROLE` when the sentinels named its address.
    private func connect(_ lane: Lane, _ generation: UInt64) throws -> Pooled? {
        let endpoint: RedisEndpoint
        switch lane {
        case .master:
            endpoint = try topology.master()
        case .replica:
            guard let r = try topology.replica() else { return nil }
            endpoint = r
        }
        let conn = try RedisConnection(endpoint, config)
        if config.usesSentinel {
            let expected = lane == .master ? "master" : "slave"
            let role: String
            do {
                role = try conn.role()
            } catch let RedisError.io(m) {
                throw RedisError.connectionFailed("\(endpoint): ROLE: \(m)")
            }
            guard role == expected else {
                throw RedisError.connectionFailed("\(endpoint) is a \(role), not a \(expected) of '\(config.sentinelMasterName ?? "")'")
            }
        }
        let recovered = state.withLock { s -> Bool in
            let l = lane.rawValue
            defer {
                s.lanes[l].backoff = 0
                s.lanes[l].retryAt = 0
            }
            if s.lanes[l].lost {
                s.lanes[l].lost = false
                s.statistics.reconnects &+= 1
            }
            return s.lanes[l].backoff > 0
        }
        if recovered { log.info("reconnected to redis at \(endpoint)") }
        return Pooled(conn: conn, lane: lane, generation: generation)
    }

    private func checkIn(_ p: Pooled, drop: Bool = false) {
        let dropped = state.withLock { s -> Bool in
            if drop || p.conn.broken || s.closed || p.generation != s.lanes[p.lane.rawValue].generation {
                s.open -= 1
                if p.conn.broken { s.lanes[p.lane.rawValue].lost = true }
                return true
            }
            s.lanes[p.lane.rawValue].idle.append(p)
            return false
        }
        if dropped { log.debug("dropping a redis connection to \(p.conn.endpoint)") }
    }
}
