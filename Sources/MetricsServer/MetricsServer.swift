import CASCore
import CLinux
import Foundation
import Synchronization

/// What one metrics server allows each client, so that no client can hurt
/// the process it reports on: a bounded number of connections (those beyond
/// get a 503 and are closed), one request at a time per connection (nothing
/// more is read while a reply is unsent), a request head of bounded size
/// that must arrive within seconds, an idle keep-alive connection closed
/// after seconds, a reply the client does not take within seconds dropped.
/// Memory is bounded by `maxConnections × (maxHeadBytes + one reply)`.
public struct MetricsServerLimits: Sendable, Equatable {
    /// Connections served at once; more are answered 503 and closed.
    public var maxConnections: Int
    /// A request (head and body) must arrive whole within this many seconds
    /// of its first byte (of the connection, for the first request).
    public var headerTimeout: Double
    /// A kept-alive connection with no request is closed after this many seconds.
    public var idleTimeout: Double
    /// A reply must be taken by the client within this many seconds.
    public var sendTimeout: Double
    /// The largest request head read (431 beyond).
    public var maxHeadBytes: Int
    /// The largest request body read and dropped (413 beyond).
    public var maxBodyBytes: Int

    public init(maxConnections: Int = 32, headerTimeout: Double = 5, idleTimeout: Double = 15, sendTimeout: Double = 10,
                maxHeadBytes: Int = 8192, maxBodyBytes: Int = 65536) {
        self.maxConnections = max(1, maxConnections)
        self.headerTimeout = max(0.01, headerTimeout)
        self.idleTimeout = max(0.01, idleTimeout)
        self.sendTimeout = max(0.01, sendTimeout)
        self.maxHeadBytes = max(256, maxHeadBytes)
        self.maxBodyBytes = max(0, maxBodyBytes)
    }

    public static let standard = MetricsServerLimits()
}

/// Serves a process's metrics to Prometheus: `GET /metrics` over HTTP/1.1
/// on one address, from a thread of its own (one `poll` loop over its own
/// close-on-exec, non-blocking sockets), so a scrape never runs on (or waits
/// for) a thread that serves the filesystem, and never holds more than
/// `MetricsServerLimits` allows. Requests are answered in order:
/// - `GET /metrics`: 200, the exposition as `text/plain; version=0.0.4`;
/// - `HEAD /metrics`: the same head, no body;
/// - another method on `/metrics`: 405 (with `Allow: GET, HEAD`);
/// - any other path: 404; what is not HTTP/1.x: 400, and the connection closes.
/// A query string is ignored; a request body (up to `maxBodyBytes`) is read
/// and dropped. The connection stays open for the next request unless the
/// client asked to close it (HTTP/1.0 without keep-alive, `Connection: close`).
public final class MetricsServer: Sendable {
    /// The address as configured.
    public let address: ListenAddress
    /// The port bound: the configured one (a free one when it was 0).
    public let port: Int
    public let limits: MetricsServerLimits
    private let loop: ServerLoop
    private let stopped = Atomic<Bool>(false)

    /// Binds `address` and serves `metrics.exposition()`. Throws
    /// `MetricsServerError` when the address cannot be bound (in use, not
    /// an address of this machine, a host name that does not resolve).
    public static func start(_ address: ListenAddress, metrics: Metrics,
                             limits: MetricsServerLimits = .standard) throws(MetricsServerError) -> MetricsServer {
        try start(address, limits: limits) { metrics.exposition() }
    }

    /// Binds `address` and serves what `render` returns (text in
    /// Prometheus's exposition format) at `/metrics`.
    public static func start(_ address: ListenAddress, limits: MetricsServerLimits = .standard,
                             render: @escaping @Sendable () -> String) throws(MetricsServerError) -> MetricsServer {
        let (fd, port) = try bind(address)
        let loop: ServerLoop
        do { loop = try ServerLoop(listener: fd, limits: limits, render: render) } catch {
            close(fd)
            throw MetricsServerError(binding: address, errno: error.code, call: error.call)
        }
        loop.start()
        return MetricsServer(address: address, port: port, limits: limits, loop: loop)
    }

    private init(address: ListenAddress, port: Int, limits: MetricsServerLimits, loop: ServerLoop) {
        self.address = address
        self.port = port
        self.limits = limits
        self.loop = loop
    }

    /// What the server has done so far.
    public struct Statistics: Sendable, Equatable {
        /// Connections served.
        public var accepted: Int
        /// Connections answered 503 and closed (over `maxConnections`), or
        /// dropped because no descriptor was left.
        public var refused: Int
        /// Connections closed for a timeout (head, idle or send).
        public var timedOut: Int
        /// Requests answered.
        public var requests: Int
        /// Connections open now.
        public var open: Int
        /// Times the listener rested (for `ServerLoop.listenerPause`)
        /// because no descriptor was left to accept a connection with, nor a
        /// spare to close to refuse it.
        public var acceptPauses: Int
    }

    public var statistics: Statistics { loop.statistics }

    /// Stops listening, closes every connection and ends the thread. Later
    /// calls do nothing.
    public func stop() {
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        loop.stop()
    }

    deinit { stop() }

    /// A listening socket (close-on-exec, non-blocking) on the first address
    /// `address` resolves to.
    private static func bind(_ address: ListenAddress) throws(MetricsServerError) -> (Int32, Int) {
        var hints = addrinfo()
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(address.host, String(address.port), &hints, &list) == 0, let first = list else {
            throw MetricsServerError(unresolved: address)
        }
        defer { freeaddrinfo(list) }
        let fd = socket(first.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw MetricsServerError(binding: address, errno: errno, call: "socket") }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard Glibc.bind(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) == 0 else {
            let e = errno
            close(fd)
            throw MetricsServerError(binding: address, errno: e, call: "bind")
        }
        guard listen(fd, 64) == 0 else {
            let e = errno
            close(fd)
            throw MetricsServerError(binding: address, errno: e, call: "listen")
        }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let port: Int = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa -> Int in
                guard getsockname(fd, sa, &length) == 0 else { return address.port }
                switch Int32(sa.pointee.sa_family) {
                case AF_INET:
                    return sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
                case AF_INET6:
                    return sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
                default:
                    return address.port
                }
            }
        }
        return (fd, port)
    }
}

struct SystemCallError: Error {
    let call: String
    let code: Int32
}
