import Foundation
import GRPCCore
import RemoteCAS
import REAPI
import Synchronization
import SwiftProtobuf

typealias BotsClient = Google_Devtools_Remoteworkers_V1test2_Bots.Client<RemoteChannel.Transport>

/// Who the bot is and how it talks to the scheduler.
public struct BotSettings: Sendable {
    /// The instance (`parent` of CreateBotSession).
    public var instanceName: String
    /// Stable across restarts of one worker, so that the scheduler closes
    /// the previous session (and requeues its leases) when it comes back.
    public var botID: String
    /// Leases at once (`worker.configs` key `capacity`).
    public var capacity: Int
    /// Matched against actions' platforms (sent as the primary device's
    /// properties, which BuildGrid reads, and as `worker.properties`).
    public var properties: [(String, String)]
    /// Deadline of one UpdateBotSession; BuildGrid long-polls up to 80% of it.
    public var pollTimeout: Double = 30
    /// After SIGTERM: how long running actions may take before they are handed back.
    public var shutdownGrace: Double = 60

    public init(instanceName: String, botID: String, capacity: Int, properties: [(String, String)]) {
        self.instanceName = instanceName
        self.botID = botID
        self.capacity = capacity
        self.properties = properties
    }
}

/// A bot of the Remote Workers API (`google.devtools.remoteworkers.v1test2.Bots`)
/// as BuildGrid serves it: CreateBotSession, then UpdateBotSession in a loop.
///
/// - New leases (BuildGrid sends them ACTIVE; PENDING is accepted too) are
///   taken up to the capacity, each run on a thread of its own, and echoed
///   ACTIVE until done; then the lease goes back COMPLETED with its `status`
///   and, when the command ran, the ActionResult in `result` (an Any).
/// - A finished lease is reported at once: a long poll in flight is cut short.
/// - A lease the scheduler drops or marks CANCELLED is killed and forgotten.
/// - A failed call is retried with back-off (0.1 s doubling to 5 s) on the
///   same session, so a restarted scheduler is picked up without a restart of
///   the worker; a session the scheduler no longer knows is created anew
///   (its leases were requeued by the scheduler, so those still running are killed).
/// - `stop()`: the bot reports BOT_TERMINATING (no new leases), lets running
///   actions finish within the grace period, then hands back the rest
///   (COMPLETED with UNAVAILABLE, which BuildGrid requeues) and returns.
public final class BotWorker: Sendable {
    private let client: GRPCClient<RemoteChannel.Transport>
    private let settings: BotSettings
    private let runner: ActionRunner
    private let metrics: WorkerMetrics?
    private let table = Mutex<LeaseTable>(LeaseTable())
    private let changed = Atomic<Bool>(false)
    private let stopState = Mutex<StopState>(StopState())

    struct StopState {
        var requested: Date?
        var force = false
    }

    struct Held {
        var id: String
        var cancellation = Cancellation()
        var outcome: LeaseOutcome?
        /// Dropped or cancelled by the scheduler: never reported.
        var dropped = false
    }

    struct LeaseTable {
        var held: [String: Held] = [:]
        var order: [String] = []
        mutating func add(_ h: Held) {
            held[h.id] = h
            order.append(h.id)
        }
        mutating func remove(_ id: String) {
            held[id] = nil
            order.removeAll { $0 == id }
        }
    }

    public init(client: GRPCClient<RemoteChannel.Transport>, settings: BotSettings, runner: ActionRunner, metrics: WorkerMetrics?) {
        self.client = client
        self.settings = settings
        self.runner = runner
        self.metrics = metrics
    }

    /// Asks the bot to stop: the first call lets running actions finish
    /// (within the grace period), a second one hands them back at once.
    public func stop() {
        let force = stopState.withLock { s -> Bool in
            if s.requested == nil {
                s.requested = Date()
            } else {
                s.force = true
            }
            return s.force
        }
        log.info(force ? "stopping now: running actions are handed back" : "stopping: no new leases; running actions may finish within \(Int(settings.shutdownGrace)) s")
        changed.store(true, ordering: .sequentiallyConsistent)
    }

    /// Number of leases held (running or not yet reported).
    public var leasesHeld: Int { table.withLock { $0.held.count } }

    /// Runs until `stop()` and every lease has been reported or handed back.
    public func run() async {
        let bots = BotsClient(wrapping: client)
        var sessionName: String?
        var version = ""
        var failures = 0
        while true {
            let (stopping, overdue) = stopState.withLock { s -> (Bool, Bool) in
                guard let at = s.requested else { return (false, false) }
                return (true, s.force || Date().timeIntervalSince(at) >= settings.shutdownGrace)
            }
            if overdue { cancelRunning() }
            let empty = table.withLock { $0.held.isEmpty }
            if stopping && empty {
                if let name = sessionName {
                    var request = Google_Devtools_Remoteworkers_V1test2_UpdateBotSessionRequest()
                    request.name = name
                    request.botSession = makeSession(name: name, version: version, stopping: true).session
                    var options = CallOptions.defaults
                    options.timeout = .seconds(5)
                    _ = try? await bots.updateBotSession(request, options: options)
                }
                log.info("stopped: every lease reported")
                return
            }
            // Whatever changes from here on interrupts the call below.
            changed.store(false, ordering: .sequentiallyConsistent)
            do {
                guard let name = sessionName else {
                    var request = Google_Devtools_Remoteworkers_V1test2_CreateBotSessionRequest()
                    request.parent = settings.instanceName
                    request.botSession = makeSession(name: "", version: "", stopping: stopping).session
                    let create = request
                    let response = try await raceChanges {
                        // Short: BuildGrid then answers at once instead of
                        // holding the call for leases (the update loop waits).
                        var options = CallOptions.defaults
                        options.timeout = .seconds(2)
                        return try await bots.createBotSession(create, options: options)
                    }
                    failures = 0
                    if let response {
                        sessionName = response.name
                        version = response.version
                        metrics?.sessionsCreated.add()
                        log.info("bot session \(response.name) created (bot \(settings.botID), capacity \(settings.capacity))")
                        accept(response, sent: [:], stopping: stopping)
                    }
                    continue
                }
                let (session, sent) = makeSession(name: name, version: version, stopping: stopping)
                var request = Google_Devtools_Remoteworkers_V1test2_UpdateBotSessionRequest()
                request.name = name
                request.botSession = session
                let update = request
                let began = Date()
                let response = try await raceChanges {
                    var options = CallOptions.defaults
                    options.timeout = .milliseconds(Int64(self.settings.pollTimeout * 1000))
                    return try await bots.updateBotSession(update, options: options)
                }
                if failures > 0 { log.info("the Bots service answers again") }
                failures = 0
                guard let response else { continue }
                version = response.version
                accept(response, sent: sent, stopping: stopping)
                // The server did not hold the call (it does not long-poll
                // while the bot holds leases): wait for a change instead of
                // asking again at once.
                let held = table.withLock { $0.held.count }
                if Date().timeIntervalSince(began) < 0.5 && held > 0 && !changed.load(ordering: .sequentiallyConsistent) {
                    await waitForChange(seconds: held < settings.capacity && !stopping ? 0.5 : 5)
                }
            } catch {
                failures += 1
                metrics?.errors.add()
                let code = (error as? RPCError)?.code
                if let code, Self.sessionLost(code), sessionName != nil {
                    log.error("the Bots service no longer knows session \(sessionName ?? ""): \(error); creating a new one (its leases were requeued)")
                    sessionName = nil
                    version = ""
                    cancelRunning(drop: true)
                } else if failures == 1 || failures % 20 == 0 {
                    log.error("call to the Bots service failed (\(failures) in a row; retrying): \(error)")
                }
                let delay = min(5, 0.1 * pow(2, Double(min(failures, 10) - 1))) * Double.random(in: 0.8...1.2)
                await waitForChange(seconds: delay)
            }
        }
    }

    /// Codes after which the session is gone on the server's side.
    static func sessionLost(_ code: RPCError.Code) -> Bool {
        [.invalidArgument, .notFound, .failedPrecondition, .outOfRange].contains(code)
    }

    /// The session to send: every held lease, ACTIVE while it runs,
    /// COMPLETED with status and result once done. `sent`: the state each
    /// lease was sent in.
    private func makeSession(name: String, version: String, stopping: Bool) -> (session: BotSession, sent: [String: Bool]) {
        var s = BotSession()
        s.name = name
        s.botID = settings.botID
        s.version = version
        s.status = stopping ? .botTerminating : .ok
        // BuildGrid matches the primary device's properties (the first
        // device: the one running the bot); the worker's are set too.
        s.worker.properties = settings.properties.map { k, v in .with { $0.key = k; $0.value = v } }
        s.worker.devices = [.with { d in
            d.handle = settings.botID
            d.properties = settings.properties.map { k, v in .with { $0.key = k; $0.value = v } }
        }]
        s.worker.configs = [.with { $0.key = "capacity"; $0.value = String(settings.capacity) }]
        var sent: [String: Bool] = [:]
        table.withLock { t in
            for id in t.order {
                guard let h = t.held[id], !h.dropped else { continue }
                var lease = Lease()
                lease.id = id
                if let outcome = h.outcome {
                    lease.state = .completed
                    lease.status = outcome.status
                    if let result = outcome.result, let any = try? Google_Protobuf_Any(message: result) {
                        lease.result = any
                    }
                    sent[id] = true
                } else {
                    lease.state = .active
                    sent[id] = false
                }
                s.leases.append(lease)
            }
        }
        return (s, sent)
    }

    /// Takes the server's answer: forgets what was reported, kills what the
    /// server dropped or cancelled, starts what is new.
    private func accept(_ response: BotSession, sent: [String: Bool], stopping: Bool) {
        var start: [(String, Google_Protobuf_Any, Cancellation)] = []
        table.withLock { t in
            let answered = Dictionary(response.leases.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
            for (id, completed) in sent {
                if completed {
                    t.remove(id)
                } else if answered[id] == nil || answered[id]?.state == .cancelled {
                    // Cancelled by the scheduler, or given to another bot.
                    if var h = t.held[id], h.outcome == nil {
                        log.info("lease \(id) was cancelled by the scheduler: stopping its action")
                        h.dropped = true
                        h.cancellation.cancel()
                        t.held[id] = h
                    }
                }
            }
            for lease in response.leases where t.held[lease.id] == nil {
                guard lease.state == .active || lease.state == .pending else { continue }
                var h = Held(id: lease.id)
                if stopping {
                    var status = RPCStatus()
                    status.code = StatusCode.unavailable.rawValue
                    status.message = "the worker is stopping"
                    h.outcome = LeaseOutcome(status: status, result: nil, outcome: "handed_back")
                    metrics?.finished("handed_back")
                } else {
                    start.append((lease.id, lease.payload, h.cancellation))
                }
                t.add(h)
            }
            metrics?.leases.set(Int64(t.held.count))
        }
        for (id, payload, cancellation) in start {
            log.info("lease \(id) accepted")
            let t = Thread { [self] in
                let outcome = runner.run(payload: payload, cancellation: cancellation)
                let held = table.withLock { t -> Int in
                    if t.held[id]?.dropped == true {
                        t.remove(id)
                    } else {
                        t.held[id]?.outcome = outcome
                    }
                    return t.held.count
                }
                metrics?.leases.set(Int64(held))
                log.info("lease \(id) done: \(outcome.outcome)\(outcome.result.map { ", exit code \($0.exitCode)" } ?? "")\(outcome.status.code != 0 ? ", status \(outcome.status.code): \(outcome.status.message)" : "")")
                changed.store(true, ordering: .sequentiallyConsistent)
            }
            t.name = "casfs-lease"
            t.stackSize = 4 << 20
            t.start()
        }
    }

    /// Kills every running action; `drop`: forget them (their leases are gone).
    private func cancelRunning(drop: Bool = false) {
        table.withLock { t in
            for id in t.order {
                guard var h = t.held[id], h.outcome == nil else { continue }
                h.cancellation.cancel()
                if drop { h.dropped = true }
                t.held[id] = h
            }
            if drop {
                for id in t.order where t.held[id]?.outcome != nil { t.remove(id) }
            }
        }
    }

    /// Runs `call` until it returns, or until something changes (a lease
    /// finished, a stop was asked): then the call is cancelled and nil returned.
    private func raceChanges<R: Sendable>(_ call: @escaping @Sendable () async throws -> R) async throws -> R? {
        try await withThrowingTaskGroup(of: R?.self) { group in
            group.addTask { try await call() }
            group.addTask { [self] in
                while !changed.load(ordering: .sequentiallyConsistent) {
                    try await Task.sleep(for: .milliseconds(20))
                }
                return nil
            }
            defer { group.cancelAll() }
            return try await group.next() ?? nil
        }
    }

    /// Sleeps up to `seconds`, less if something changes (the change stays pending).
    private func waitForChange(seconds: Double) async {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end && !changed.load(ordering: .sequentiallyConsistent) {
            try? await Task.sleep(for: .milliseconds(20))
        }
    }
}
