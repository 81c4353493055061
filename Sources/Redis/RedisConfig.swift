import Foundation

/// Where and how to reach a Redis server.
public struct RedisConfig: Sendable, Equatable {
    /// TCP host (ignored when `unixSocket` is set).
    public var host: String
    /// TCP port (ignored when `unixSocket` is set).
    public var port: Int
    /// Path of a unix socket; takes precedence over host and port.
    public var unixSocket: String?
    /// Sent with AUTH after connecting, when set.
    public var password: String?
    /// Database number, selected after connecting when not 0.
    public var db: Int
    /// Seconds allowed for establishing a connection.
    public var connectTimeout: Double
    /// Seconds allowed for each socket read or write of a command or pipeline.
    public var commandTimeout: Double
    /// Most connections open at once; callers beyond that wait for one to be returned.
    public var maxConnections: Int
    /// First delay before reconnecting after a failed connect; doubles up to `maxBackoff`.
    public var minBackoff: Double
    /// Longest delay between reconnect attempts.
    public var maxBackoff: Double

    public init(
        host: String = "127.0.0.1", port: Int = 6379, unixSocket: String? = nil,
        password: String? = nil, db: Int = 0,
        connectTimeout: Double = 2, commandTimeout: Double = 5,
        maxConnections: Int = 16, minBackoff: Double = 0.05, maxBackoff: Double = 2
    ) {
        self.host = host
        self.port = port
        self.unixSocket = unixSocket
        self.password = password
        self.db = db
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.maxConnections = maxConnections
        self.minBackoff = minBackoff
        self.maxBackoff = maxBackoff
    }

    /// `unix:<path>` or `<host>:<port>`, with `/db` when not 0. Never includes the password.
    public var endpoint: String {
        let base = unixSocket.map { "unix:\($0)" } ?? "\(host):\(port)"
        return db == 0 ? base : "\(base)/\(db)"
    }
}
