import CASCore
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// Serves a process's metrics to Prometheus: `GET /metrics` over HTTP/1.1
/// on one address, answered from an event-loop thread of its own, so a
/// scrape never runs on (or waits for) a thread that serves the filesystem.
/// See `MetricsHTTPHandler` for what each request is answered.
public final class MetricsServer: Sendable {
    /// The address as configured.
    public let address: ListenAddress
    /// The port bound: the configured one (a free one when it was 0).
    public let port: Int

    private let group: MultiThreadedEventLoopGroup
    private let channel: any Channel
    private let stopped = Atomic<Bool>(false)

    /// Connections idle this long (no request, no reply) are closed.
    static let idleTimeout = TimeAmount.minutes(5)

    /// Binds `address` and serves `metrics.exposition()`. Throws
    /// `MetricsServerError` when the address cannot be bound (in use, not
    /// an address of this machine, a host name that does not resolve).
    public static func start(_ address: ListenAddress, metrics: Metrics) throws(MetricsServerError) -> MetricsServer {
        try start(address) { metrics.exposition() }
    }

    /// Binds `address` and serves what `render` returns (text in
    /// Prometheus's exposition format) at `/metrics`.
    public static func start(_ address: ListenAddress,
                             render: @escaping @Sendable () -> String) throws(MetricsServerError) -> MetricsServer {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    try pipeline.addHandler(IdleStateHandler(allTimeout: MetricsServer.idleTimeout))
                    try pipeline.configureHTTPServerPipeline(withErrorHandling: true)
                    try pipeline.addHandler(MetricsHTTPHandler(render: render))
                }
            }
        let channel: any Channel
        do {
            channel = try bootstrap.bind(host: address.host, port: address.port).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw MetricsServerError(binding: address, error)
        }
        return MetricsServer(address: address, port: channel.localAddress?.port ?? address.port,
                             group: group, channel: channel)
    }

    private init(address: ListenAddress, port: Int, group: MultiThreadedEventLoopGroup, channel: any Channel) {
        self.address = address
        self.port = port
        self.group = group
        self.channel = channel
    }

    /// Stops listening, closes every connection and ends the thread. Call
    /// it from an ordinary thread; later calls do nothing.
    public func stop() {
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}
