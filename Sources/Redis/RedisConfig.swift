import Foundation

/// Where and how to reach a Redis server: directly (a unix socket or one
/// host and port), through a DNS SRV record, or through Redis Sentinel.
///
/// Precedence, as in BuildGrid's `!redis-connection`: a unix socket wins;
/// otherwise `dnsSRVRecord`, when set, replaces host and port with the
/// records it resolves to. Without `sentinelMasterName` the first record (or
/// host and port) is the server. With it, every record (or `sentinels`, or
/// else host and port) names a sentinel, and the server is the master the
/// sentinels name.
public struct RedisConfig: Sendable, Equatable {
    /// TCP host (ignored when `unixSocket` is set).
    public var host: String
    /// TCP port (ignored when `unixSocket` is set).
    public var port: Int
    /// Path of a unix socket; takes precedence over host and port.
    public var unixSocket: String?
    /// Sent with AUTH to the server (not to sentinels) after connecting, when set.
    public var password: String?
    /// Database number, selected after connecting when not 0.
    public var db: Int
    /// Seconds allowed for establishing a connection.
    public var connectTimeout: Double
    /// Seconds allowed for each socket read or write of a command or pipeline.
    public var commandTimeout: Double
    /// Most connections open at once; callers beyond that wait for one to be returned.
    public var maxConnections: Int
    /// First delay before a new connection is attempted after a failed connect;
    /// doubles up to `maxBackoff`. Callers that retry wait for it.
    public var minBackoff: Double
    /// Longest delay between connect attempts.
    public var maxBackoff: Double

    /// Name of the master monitored by Redis Sentinel (`sentinel-master-name`).
    /// When set, connections go to the master the sentinels name.
    public var sentinelMasterName: String?
    /// Sentinels to ask; empty means `host`:`port` (or the SRV records).
    public var sentinels: [RedisHostPort]
    /// A DNS SRV record (`dns-srv-record`), looked up by exactly this name. Its
    /// targets replace host and port: the first is the server, or all are
    /// sentinels. Looked up again after every failure that is retried.
    public var dnsSRVRecord: String?
    /// DNS servers asked for the SRV record; empty means the `nameserver`
    /// lines of /etc/resolv.conf.
    public var dnsServers: [RedisHostPort]
    /// How many times a command (or pipeline) is sent again after a
    /// connection error, a timeout, a LOADING reply or, with sentinels, a
    /// READONLY reply (`retries`). BuildGrid's default is 3.
    public var retries: Int
    /// Back-off before retry n: t/2 plus a random part up to t/2, where
    /// t = min(`retryBackoffCap`, `retryBackoffBase` · 2ⁿ) (BuildGrid's equal jitter).
    public var retryBackoffBase: Double
    /// See `retryBackoffBase`.
    public var retryBackoffCap: Double

    /// Replicas that must acknowledge a durable pipeline (`WAIT`); nil means
    /// 1 with sentinels and 0 (no WAIT) otherwise. See `RedisPool.pipeline(_:durable:)`.
    public var durableReplicas: Int?
    /// Seconds a durable pipeline waits for the acknowledgements (its socket
    /// reads are allowed this much longer than `commandTimeout`). Replicas normally acknowledge
    /// within a round trip, but for about a second after a full resync a
    /// master sends nothing to the replica, so less than that fails writes
    /// whenever a replica has just (re)joined.
    public var durableTimeout: Double
    /// What a durable pipeline does when fewer replicas acknowledged.
    public var durableShortfall: RedisDurableShortfall
    /// Lets reads marked `readOnly` go to a replica (with sentinels only).
    public var readFromReplicas: Bool

    public init(
        host: String = "127.0.0.1", port: Int = 6379, unixSocket: String? = nil,
        password: String? = nil, db: Int = 0,
        connectTimeout: Double = 2, commandTimeout: Double = 5,
        maxConnections: Int = 16, minBackoff: Double = 0.05, maxBackoff: Double = 0.5,
        sentinelMasterName: String? = nil, sentinels: [RedisHostPort] = [],
        dnsSRVRecord: String? = nil, dnsServers: [RedisHostPort] = [],
        retries: Int = 3, retryBackoffBase: Double = 0.008, retryBackoffCap: Double = 0.512,
        durableReplicas: Int? = nil, durableTimeout: Double = 2,
        durableShortfall: RedisDurableShortfall = .acceptIfReplicasDown,
        readFromReplicas: Bool = false
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
        self.sentinelMasterName = sentinelMasterName
        self.sentinels = sentinels
        self.dnsSRVRecord = dnsSRVRecord
        self.dnsServers = dnsServers
        self.retries = retries
        self.retryBackoffBase = retryBackoffBase
        self.retryBackoffCap = retryBackoffCap
        self.durableReplicas = durableReplicas
        self.durableTimeout = durableTimeout
        self.durableShortfall = durableShortfall
        self.readFromReplicas = readFromReplicas
    }

    /// True when the server is found through Redis Sentinel.
    var usesSentinel: Bool { unixSocket == nil && sentinelMasterName != nil }

    /// Replicas a durable pipeline waits for (never negative).
    var effectiveDurableReplicas: Int { max(0, durableReplicas ?? (usesSentinel ? 1 : 0)) }

    /// A description for messages: `unix:<path>`, `<host>:<port>`,
    /// `srv:<record>` or `sentinel:<master>@<where>`, with `/db` when not 0.
    /// Never includes the password.
    public var endpoint: String {
        var base: String
        if let unixSocket {
            base = "unix:\(unixSocket)"
        } else {
            let place = dnsSRVRecord.map { "srv:\($0)" }
                ?? (sentinels.isEmpty ? "\(host):\(port)" : sentinels.map(\.description).joined(separator: ","))
            base = sentinelMasterName.map { "sentinel:\($0)@\(place)" } ?? place
        }
        if db != 0 { base += "/\(db)" }
        return base
    }
}

/// A TCP host and port.
public struct RedisHostPort: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses `host:port` or `[v6]:port`; nil when malformed or the port is not 1...65535.
    public init?(parsing text: String, defaultPort: Int? = nil) {
        var hostPart = Substring(text)
        var portPart: Substring?
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            hostPart = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            if !rest.isEmpty {
                guard rest.first == ":" else { return nil }
                portPart = rest.dropFirst()
            }
        } else if let colon = text.lastIndex(of: ":"), text.firstIndex(of: ":") == colon {
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
        }
        guard !hostPart.isEmpty else { return nil }
        let port: Int
        if let portPart {
            guard let p = Int(portPart), (1...65535).contains(p) else { return nil }
            port = p
        } else {
            guard let d = defaultPort else { return nil }
            port = d
        }
        self.init(host: String(hostPart), port: port)
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// What a durable pipeline does when `WAIT` reports fewer acknowledging
/// replicas than asked. In every case, when the sentinels say the master has
/// moved or is being failed over, the pipeline is sent again to the master
/// they name (the writes on the old one are about to be discarded).
public enum RedisDurableShortfall: String, Sendable, Equatable, CaseIterable {
    /// Fail the pipeline. Writes stop while any replica is down.
    case fail
    /// Succeed (with a warning) only when the replicas that did not
    /// acknowledge are known to be down: with sentinels, flagged down or
    /// disconnected by the sentinel (such replicas cannot be promoted);
    /// without, not connected to the master. A replica that is up but
    /// did not acknowledge in time fails the pipeline.
    case acceptIfReplicasDown = "accept-if-replicas-down"
    /// Succeed with a warning.
    case accept
}
