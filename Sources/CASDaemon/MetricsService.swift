import CASCore
import MetricsServer
import ServiceLifecycle

/// The metrics server as a service: bound when made (so a bad address fails
/// before anything is mounted), stopped at graceful shutdown.
public struct MetricsService: Service {
    public let server: MetricsServer

    public init(_ server: MetricsServer) {
        self.server = server
    }

    /// Binds `address` and serves `metrics` there.
    public static func bind(_ address: ListenAddress, metrics: Metrics) throws -> MetricsService {
        MetricsService(try MetricsServer.start(address, metrics: metrics))
    }

    /// The port bound (the configured one, or a free one when it was 0).
    public var port: Int { server.port }

    public func run() async throws {
        await untilShutdown { server.stop() }
    }
}
