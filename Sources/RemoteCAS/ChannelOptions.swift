import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2

/// The `channel-options` of a BuildGrid `!remote-storage`: gRPC core channel
/// arguments written without their `grpc.` prefix and with dashes for
/// underscores (`keepalive-time-ms` is `grpc.keepalive_time_ms`). BuildGrid's
/// schema allows names matching `^[a-z0-9-]+$`, so the arguments with a dot
/// in their name (`grpc.http2.*`) cannot be written there and are not known
/// here either. (BuildGrid 0.8 parses the options but never passes them to
/// its channel.)
///
/// Values are the YAML scalars as text. Arguments with an equivalent in the
/// NIO HTTP/2 transport are applied:
///
/// | option | effect |
/// |---|---|
/// | `keepalive-time-ms` | HTTP/2 PING every so often (2147483647 = off, gRPC's default) |
/// | `keepalive-timeout-ms` | how long to wait for the PING's answer (default 20000) |
/// | `keepalive-permit-without-calls` | 0/1: PING while no call is open |
/// | `max-receive-message-length` | largest message accepted from the server, bytes; -1 = no limit |
/// | `max-send-message-length` | largest message sent: caps batch requests and upload chunks; -1 = no limit |
/// | `client-idle-timeout-ms` | close an idle connection after this long (2147483647 = never) |
/// | `initial-reconnect-backoff-ms`, `max-reconnect-backoff-ms` | connection attempt back-off |
/// | `default-authority`, `ssl-target-name-override` | the `:authority` and TLS name (SNI and the name checked in the server's certificate) |
/// | `default-compression-algorithm` | 0/identity, 1/deflate, 2/gzip: gRPC message compression of requests |
/// | `compression-enabled-algorithms-bitset` | which of those are accepted (bit 0 identity, 1 deflate, 2 gzip) |
///
/// Other gRPC core client and server arguments (`lb-policy-name`,
/// `enable-retries`, `primary-user-agent`, `min-reconnect-backoff-ms`, ...)
/// have no equivalent: they are accepted and listed in `ignored` (logged once
/// as a warning), so that a configuration BuildGrid loads also loads here. A
/// name that is no gRPC channel argument at all, or a value that does not
/// parse, is a `RemoteSetupError` naming it.
public struct ChannelOptions: Sendable, Equatable {
    public var keepaliveTime: Duration?
    public var keepaliveTimeout: Duration = .seconds(20)
    public var keepalivePermitWithoutCalls = false
    /// nil: the default (64 MiB); `Int(UInt32.max)`: no limit.
    public var maxReceiveMessageBytes: Int?
    public var maxSendMessageBytes: Int?
    /// nil: the transport's default (30 minutes); `.some(nil)`: never.
    public var idleTimeout: Duration??
    public var initialReconnectBackoff: Duration?
    public var maxReconnectBackoff: Duration?
    public var authority: String?
    public var compression: CompressionAlgorithm?
    public var enabledCompression: CompressionAlgorithmSet?
    /// Options accepted without effect, by name.
    public private(set) var ignored: [String] = []

    /// Smallest `max-send-message-length` casfs can work with: batch and
    /// chunk sizes are derived from it.
    public static let minimumSendLimit = 64 << 10
    /// Larger than any gRPC message can be (a 4-byte length prefix).
    static let unlimited = Int(UInt32.max)
    static let intMax = Int64(Int32.max)

    public init() {}

    public init(_ options: [String: String]) throws {
        for name in options.keys.sorted() {
            try set(name, options[name]!)
        }
    }

    private mutating func set(_ name: String, _ value: String) throws {
        let key = "channel-options.\(name)"
        guard !name.isEmpty, name.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D }) else {
            throw RemoteSetupError(key: key, "option names are gRPC channel arguments in lower case with dashes, e.g. keepalive-time-ms (BuildGrid's pattern ^[a-z0-9-]+$)")
        }
        switch name {
        case "keepalive-time-ms":
            let ms = try Self.int(key, value, 1...Self.intMax)
            keepaliveTime = ms == Self.intMax ? nil : .milliseconds(ms)
        case "keepalive-timeout-ms":
            keepaliveTimeout = .milliseconds(try Self.int(key, value, 1...Self.intMax))
        case "keepalive-permit-without-calls":
            keepalivePermitWithoutCalls = try Self.bool(key, value)
        case "max-receive-message-length":
            maxReceiveMessageBytes = try Self.limit(key, value, minimum: 1)
        case "max-send-message-length":
            maxSendMessageBytes = try Self.limit(key, value, minimum: Self.minimumSendLimit)
        case "client-idle-timeout-ms":
            let ms = try Self.int(key, value, 1000...Self.intMax)
            idleTimeout = .some(ms == Self.intMax ? nil : .milliseconds(ms))
        case "initial-reconnect-backoff-ms":
            initialReconnectBackoff = .milliseconds(try Self.int(key, value, 1...Self.intMax))
        case "max-reconnect-backoff-ms":
            maxReconnectBackoff = .milliseconds(try Self.int(key, value, 1...Self.intMax))
        case "default-authority", "ssl-target-name-override":
            let v = value.trimmingCharacters(in: .whitespaces)
            guard !v.isEmpty, v.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
                throw RemoteSetupError(key: key, "'\(value)' is not a host name")
            }
            if let a = authority, a != v {
                throw RemoteSetupError(key: key, "conflicts with the other authority option ('\(a)')")
            }
            authority = v
        case "default-compression-algorithm":
            switch value.lowercased() {
            case "0", "identity", "none": compression = CompressionAlgorithm.none
            case "1", "deflate": compression = .deflate
            case "2", "gzip": compression = .gzip
            default: throw RemoteSetupError(key: key, "'\(value)' is not 0 (identity), 1 (deflate) or 2 (gzip)")
            }
        case "compression-enabled-algorithms-bitset":
            let bits = try Self.int(key, value, 0...7)
            enabledCompression = CompressionAlgorithmSet(rawValue: UInt32(bits))
        default:
            guard Self.withoutEquivalent.contains(name) else {
                throw RemoteSetupError(key: key, "unknown gRPC channel argument 'grpc.\(name.replacingOccurrences(of: "-", with: "_"))'")
            }
            ignored.append(name)
        }
    }

    /// Applies the transport settings.
    func apply(to config: inout HTTP2ClientTransport.Posix.Config) {
        if let t = keepaliveTime {
            config.connection.keepalive = .init(time: t, timeout: keepaliveTimeout, allowWithoutCalls: keepalivePermitWithoutCalls)
        }
        if let idle = idleTimeout { config.connection.maxIdleTime = idle }
        if let b = initialReconnectBackoff { config.backoff.initial = b }
        if let b = maxReconnectBackoff { config.backoff.max = b }
        if config.backoff.max < config.backoff.initial { config.backoff.max = config.backoff.initial }
        if let a = authority { config.http2.authority = a }
        if let c = compression {
            config.compression.algorithm = c
            config.compression.enabledAlgorithms.insert(c == .gzip ? .gzip : c == .deflate ? .deflate : .none)
        }
        if let e = enabledCompression { config.compression.enabledAlgorithms = e }
    }

    func logIgnored() {
        if !ignored.isEmpty {
            log.warning("channel-options without an equivalent in casfs's gRPC transport, ignored: \(ignored.joined(separator: ", "))")
        }
    }

    // MARK: - Values

    private static func int(_ key: String, _ value: String, _ range: ClosedRange<Int64>) throws -> Int64 {
        guard let v = Int64(value.trimmingCharacters(in: .whitespaces)), range.contains(v) else {
            throw RemoteSetupError(key: key, "'\(value)' is not an integer from \(range.lowerBound) to \(range.upperBound)")
        }
        return v
    }

    private static func bool(_ key: String, _ value: String) throws -> Bool {
        switch value.lowercased() {
        case "1", "true": return true
        case "0", "false": return false
        default: throw RemoteSetupError(key: key, "'\(value)' is not 0 or 1")
        }
    }

    /// A message size in bytes; -1 means no limit, as in gRPC.
    private static func limit(_ key: String, _ value: String, minimum: Int) throws -> Int {
        if value.trimmingCharacters(in: .whitespaces) == "-1" { return unlimited }
        return Int(try int(key, value, Int64(minimum)...intMax))
    }

    /// gRPC core channel arguments (include/grpc/impl/channel_arg_names.h and
    /// compression_types.h) whose names BuildGrid's pattern can express and
    /// which have no counterpart here.
    static let withoutEquivalent: Set<String> = [
        "census", "loadreporting", "server-call-metric-recording", "minimal-stack",
        "max-concurrent-streams", "max-connection-idle-ms", "max-connection-age-ms",
        "max-connection-age-grace-ms", "per-message-compression", "per-message-decompression",
        "http2-scheme", "primary-user-agent", "secondary-user-agent", "min-reconnect-backoff-ms",
        "dns-min-time-between-resolutions-ms", "server-handshake-timeout-ms", "ssl-session-cache",
        "max-metadata-size", "absolute-max-metadata-size", "so-reuseport", "resource-quota",
        "expand-wildcard-addrs", "service-config", "service-config-disable-resolution",
        "lb-policy-name", "socket-mutator", "socket-factory", "max-channel-trace-event-memory-per-node",
        "enable-channelz", "use-cronet-packet-coalescing", "tcp-receive-buffer-size",
        "grpclb-call-timeout-ms", "grpclb-fallback-timeout-ms", "priority-failover-timeout-ms",
        "optimization-target", "enable-retries", "per-rpc-retry-buffer-size", "mobile-log-context",
        "disable-client-authority-filter", "enable-http-proxy", "http-proxy", "address-http-proxy",
        "address-http-proxy-enabled-addresses", "surface-user-agent", "inhibit-health-checking",
        "dns-enable-srv-queries", "dns-ares-query-timeout", "use-local-subchannel-pool",
        "channel-pooling-domain", "channel-id", "authorization-policy-provider", "dscp",
        "happy-eyeballs-connection-attempt-delay-ms", "max-allowed-incoming-connections",
        "security-frame-allowed", "default-compression-level", "enable-deadline-checking",
    ]
}
