import CLinux
import Foundation
import Synchronization

/// The metrics server's one thread: a `poll` loop over the listening
/// socket, a wake-up pipe and the connections. Everything but `stop()` and
/// `statistics` runs on that thread.
final class ServerLoop: @unchecked Sendable {
    private let listener: Int32
    private let wakeRead: Int32
    private let wakeWrite: Int32
    /// Closed to make room for one accept when descriptors run out, so a
    /// connection that cannot be served is closed rather than left to spin
    /// the loop.
    private var reserve: Int32
    /// While set (a monotonic time), the listener is not polled: accepting
    /// failed for want of descriptors and there was no spare to close.
    private var listenerPausedUntil: Double = 0
    static let listenerPause = 0.1
    private let limits: MetricsServerLimits
    private let render: @Sendable () -> String
    private var connections: [Int32: Connection] = [:]
    private let finished = DispatchSemaphore(value: 0)
    private let counters = Mutex(MetricsServer.Statistics(accepted: 0, refused: 0, timedOut: 0, requests: 0, open: 0, acceptPauses: 0))

    init(listener: Int32, limits: MetricsServerLimits, render: @escaping @Sendable () -> String) throws(SystemCallError) {
        var fds: [Int32] = [-1, -1]
        guard casfs_pipe_cloexec(&fds) == 0 else { throw SystemCallError(call: "pipe", code: errno) }
        self.listener = listener
        wakeRead = fds[0]
        wakeWrite = fds[1]
        _ = fcntl(wakeRead, F_SETFL, O_NONBLOCK)
        _ = fcntl(wakeWrite, F_SETFL, O_NONBLOCK)
        reserve = open("/dev/null", O_RDONLY | O_CLOEXEC)
        self.limits = limits
        self.render = render
    }

    var statistics: MetricsServer.Statistics { counters.withLock { $0 } }

    func start() {
        let t = Thread { [self] in
            run()
            finished.signal()
        }
        t.name = "casfs-metrics"
        t.start()
    }

    /// Wakes the loop, which closes everything; returns once it has.
    func stop() {
        var b: UInt8 = 1
        _ = write(wakeWrite, &b, 1)
        finished.wait()
        close(wakeWrite)
    }

    // MARK: the loop

    private func run() {
        defer {
            for fd in connections.keys { close(fd) }
            connections.removeAll()
            close(listener)
            close(wakeRead)
            if reserve >= 0 { close(reserve) }
            counters.withLock { $0.open = 0 }
        }
        var fds: [pollfd] = []
        while true {
            // The spare descriptor, lost when another thread took its slot: taken again as soon as one is free.
            if reserve < 0 { reserve = open("/dev/null", O_RDONLY | O_CLOEXEC) }
            let now = Self.now()
            if listenerPausedUntil <= now { listenerPausedUntil = 0 }
            let listening = listenerPausedUntil == 0
            fds.removeAll(keepingCapacity: true)
            fds.append(pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0))
            // Left out while connections cannot be taken (nor refused): it would stay readable and spin the loop.
            fds.append(pollfd(fd: listening ? listener : -1, events: Int16(POLLIN), revents: 0))
            for (fd, c) in connections {
                fds.append(pollfd(fd: fd, events: Int16(c.isWriting ? POLLOUT : POLLIN), revents: 0))
            }
            let next = (connections.values.map(\.deadline) + (listening ? [] : [listenerPausedUntil])).min()
            let timeout = next.map { Int32(max(0, min(60_000, (($0 - now) * 1000).rounded(.up)))) } ?? -1
            let n = poll(&fds, nfds_t(fds.count), timeout)
            if n < 0 && errno != EINTR { usleep(10_000) }
            if fds[0].revents != 0 { return }
            if listening && fds[1].revents & Int16(POLLIN) != 0 { acceptAll() }
            for p in fds.dropFirst(2) where p.revents != 0 {
                guard let c = connections[p.fd] else { continue }
                if p.revents & Int16(POLLNVAL | POLLERR) != 0 {
                    drop(c)
                    continue
                }
                if c.isWriting {
                    if p.revents & Int16(POLLOUT | POLLHUP) != 0 { flush(c) }
                } else if p.revents & Int16(POLLIN | POLLHUP) != 0 {
                    receive(c)
                }
            }
            let later = Self.now()
            for c in connections.values where c.deadline <= later {
                counters.withLock { $0.timedOut += 1 }
                drop(c)
            }
        }
    }

    private func acceptAll() {
        if reserve < 0 { reserve = open("/dev/null", O_RDONLY | O_CLOEXEC) }
        for _ in 0..<64 {
            let fd = casfs_accept_cloexec_nonblock(listener)
            if fd < 0 {
                let e = errno
                if e == EMFILE || e == ENFILE, reserve >= 0 {
                    // No descriptor left: take the connection off the queue and close it.
                    close(reserve)
                    let dropped = casfs_accept_cloexec_nonblock(listener)
                    if dropped >= 0 { close(dropped) }
                    reserve = open("/dev/null", O_RDONLY | O_CLOEXEC)
                    // None was waiting any more: done until the listener is readable again.
                    guard dropped >= 0 else { return }
                    counters.withLock { $0.refused += 1 }
                    continue
                }
                switch e {
                case EAGAIN, EWOULDBLOCK, EINTR, ECONNABORTED, EPROTO:
                    break
                default:
                    // Out of descriptors with no spare (or out of memory): the connection
                    // waits in the queue; the listener rests a moment rather than spin.
                    listenerPausedUntil = Self.now() + Self.listenerPause
                    counters.withLock { $0.acceptPauses += 1 }
                }
                return
            }
            if connections.count >= limits.maxConnections {
                let busy = Array("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".utf8)
                _ = busy.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                close(fd)
                counters.withLock { $0.refused += 1 }
                continue
            }
            var one: Int32 = 1
            _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            connections[fd] = Connection(fd: fd, deadline: Self.now() + limits.headerTimeout)
            counters.withLock {
                $0.accepted += 1
                $0.open = connections.count
            }
        }
    }

    private func drop(_ c: Connection) {
        close(c.fd)
        connections[c.fd] = nil
        counters.withLock { $0.open = connections.count }
    }

    /// Reads what fits, then answers what is complete.
    private func receive(_ c: Connection) {
        let room: Int
        if case .discardingBody(let left, _) = c.phase {
            room = min(16384, max(1, left))
        } else {
            room = limits.maxHeadBytes + 4 - c.input.count
        }
        guard room > 0 else {
            respond(c, Self.simple(431, "Request Header Fields Too Large"), close: true)
            return
        }
        var buffer = [UInt8](repeating: 0, count: min(room, 16384))
        let n = buffer.withUnsafeMutableBytes { recv(c.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        if n == 0 {
            drop(c)  // the client closed: nothing more to answer
            return
        }
        if n < 0 {
            if errno == EAGAIN || errno == EINTR { return }
            drop(c)
            return
        }
        if case .idle = c.phase {
            // The first byte of the next request: it has a head timeout from now.
            c.phase = .awaitingHead
            c.deadline = Self.now() + limits.headerTimeout
        }
        c.input.append(contentsOf: buffer[0..<n])
        process(c)
    }

    /// Answers the requests complete in `c.input`, one at a time: stops at
    /// the first reply that cannot be sent at once.
    private func process(_ c: Connection) {
        while connections[c.fd] === c && !c.isWriting {
            switch c.phase {
            case .writing:
                return
            case .discardingBody(let left, let request):
                let take = min(left, c.input.count)
                c.input.removeFirst(take)
                if left - take > 0 {
                    c.phase = .discardingBody(left: left - take, request: request)
                    return
                }
                answer(c, request)
            case .idle, .awaitingHead:
                if c.input.isEmpty { return }
                if case .idle = c.phase {
                    c.phase = .awaitingHead
                    c.deadline = Self.now() + limits.headerTimeout
                }
                guard let (headEnd, next) = Self.findHeadEnd(c.input) else {
                    if c.input.count > limits.maxHeadBytes {
                        respond(c, Self.simple(431, "Request Header Fields Too Large"), close: true)
                    }
                    return
                }
                guard headEnd <= limits.maxHeadBytes else {
                    respond(c, Self.simple(431, "Request Header Fields Too Large"), close: true)
                    return
                }
                let request: HTTPRequestHead
                do { request = try HTTPRequestHead.parse(c.input[0..<headEnd], maxBody: limits.maxBodyBytes) } catch {
                    switch error {
                    case .malformed: respond(c, Self.simple(400, "Bad Request"), close: true)
                    case .bodyTooLarge: respond(c, Self.simple(413, "Content Too Large"), close: true)
                    }
                    return
                }
                c.input.removeFirst(next)
                if request.contentLength > 0 {
                    c.phase = .discardingBody(left: request.contentLength, request: request)
                } else {
                    answer(c, request)
                }
            }
        }
    }

    /// The end of the head (the index of the line break that ends it) and
    /// where what follows starts, if the blank line has arrived.
    static func findHeadEnd(_ input: [UInt8]) -> (Int, Int)? {
        var i = 0
        let nl = UInt8(ascii: "\n"), cr = UInt8(ascii: "\r")
        while i < input.count {
            if input[i] == nl {
                if i + 1 < input.count && input[i + 1] == nl { return (i, i + 2) }
                if i + 2 < input.count && input[i + 1] == cr && input[i + 2] == nl { return (i, i + 3) }
            }
            i += 1
        }
        return nil
    }

    private func answer(_ c: Connection, _ request: HTTPRequestHead) {
        counters.withLock { $0.requests += 1 }
        let path = request.target.prefix { $0 != "?" }
        var head = ""
        var body = ""
        if path != "/metrics" {
            head = "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
            body = "not found; metrics are at /metrics\n"
        } else if request.method == "GET" || request.method == "HEAD" {
            head = "HTTP/1.1 200 OK\r\nContent-Type: \(Self.contentType)\r\n"
            body = render()
        } else {
            head = "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\nAllow: GET, HEAD\r\n"
            body = "method not allowed\n"
        }
        let bytes = Array(body.utf8)
        head += "Content-Length: \(bytes.count)\r\n"
        if !request.keepAlive {
            head += "Connection: close\r\n"
        } else if request.minorVersion == 0 {
            head += "Connection: keep-alive\r\n"
        }
        head += "\r\n"
        var reply = Array(head.utf8)
        if request.method != "HEAD" { reply += bytes }
        respond(c, reply, close: !request.keepAlive)
    }

    /// Starts sending `reply`; nothing more is read from `c` until it is sent.
    private func respond(_ c: Connection, _ reply: [UInt8], close: Bool) {
        c.output = reply
        c.sent = 0
        c.closeAfterReply = close
        c.phase = .writing
        c.deadline = Self.now() + limits.sendTimeout
        flush(c)
    }

    private func flush(_ c: Connection) {
        while c.sent < c.output.count {
            let n = c.output.withUnsafeBytes { raw in
                send(c.fd, raw.baseAddress! + c.sent, raw.count - c.sent, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            }
            if n > 0 {
                c.sent += n
                continue
            }
            if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
            drop(c)
            return
        }
        c.output = []
        c.sent = 0
        if c.closeAfterReply {
            // Whatever else the client sent is not read.
            drop(c)
            return
        }
        c.phase = .idle
        c.deadline = Self.now() + limits.idleTimeout
        // A pipelined request may be waiting in the buffer.
        process(c)
    }

    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    static func simple(_ status: Int, _ reason: String) -> [UInt8] {
        Array("HTTP/1.1 \(status) \(reason)\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".utf8)
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// One client connection.
final class Connection {
    enum Phase {
        /// Keep-alive, waiting for the first byte of a request (idle timeout).
        case idle
        /// Reading a request head (head timeout).
        case awaitingHead
        /// Reading and dropping a body before answering `request`.
        case discardingBody(left: Int, request: HTTPRequestHead)
        /// A reply is being sent; nothing is read meanwhile.
        case writing
    }

    let fd: Int32
    var phase = Phase.awaitingHead
    var deadline: Double
    var input: [UInt8] = []
    var output: [UInt8] = []
    var sent = 0
    var closeAfterReply = false

    init(fd: Int32, deadline: Double) {
        self.fd = fd
        self.deadline = deadline
    }

    var isWriting: Bool {
        if case .writing = phase { return true }
        return false
    }
}
