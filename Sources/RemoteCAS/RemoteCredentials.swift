/// The `credentials` of a BuildGrid `!remote-storage`: paths of PEM files for
/// TLS and of a file holding a bearer token.
///
/// - `tlsServerCert` (`tls-server-cert`): the certificates to trust for the
///   server (a CA bundle or the server's own certificate) instead of the
///   system's roots.
/// - `tlsClientKey` + `tlsClientCert` (`tls-client-key`, `tls-client-cert`):
///   the key and certificate chain offered to a server that asks for client
///   certificates (mutual TLS). One without the other is an error.
/// - `authToken` (`auth-token`): a file whose contents, trimmed of white
///   space, are sent on every call as `authorization: Bearer <token>`.
/// - `tokenRefreshSeconds` (`token-refresh-seconds`): how long a token read
///   from the file is used before the file is read again; nil or 0 means
///   3600 s, BuildGrid's default.
///
/// As with BuildGrid, the TLS files only apply to `https://` and `grpcs://`
/// URLs; with `http://` or `grpc://` they are ignored (with a warning) while
/// the token is still sent.
public struct RemoteCredentials: Sendable, Equatable {
    public var tlsServerCert: String?
    public var tlsClientKey: String?
    public var tlsClientCert: String?
    public var authToken: String?
    public var tokenRefreshSeconds: Double?

    /// BuildGrid's `DEFAULT_TOKEN_REFRESH_SECONDS`.
    public static let defaultTokenRefreshSeconds: Double = 3600

    public init(tlsServerCert: String? = nil, tlsClientKey: String? = nil, tlsClientCert: String? = nil,
                authToken: String? = nil, tokenRefreshSeconds: Double? = nil) {
        self.tlsServerCert = tlsServerCert
        self.tlsClientKey = tlsClientKey
        self.tlsClientCert = tlsClientCert
        self.authToken = authToken
        self.tokenRefreshSeconds = tokenRefreshSeconds
    }

    public static let none = RemoteCredentials()

    var hasTLSFiles: Bool { tlsServerCert != nil || tlsClientKey != nil || tlsClientCert != nil }

    /// The refresh interval in force, checked.
    func refreshInterval() throws -> Double {
        guard let s = tokenRefreshSeconds else { return Self.defaultTokenRefreshSeconds }
        guard s.isFinite, s >= 0 else {
            throw RemoteSetupError(key: "credentials.token-refresh-seconds", "must be a number of seconds, at least 0")
        }
        return s == 0 ? Self.defaultTokenRefreshSeconds : s
    }
}

/// A remote CAS that cannot be set up as configured: a credential file that
/// is missing or unreadable, a channel option that is unknown, a number out
/// of range. `key` is the configuration key at fault, spelled as in
/// BuildGrid's YAML (`credentials.auth-token`, `channel-options.keepalive-time-ms`).
public struct RemoteSetupError: Error, Equatable, CustomStringConvertible {
    public let key: String
    public let message: String

    public init(key: String, _ message: String) {
        self.key = key
        self.message = message
    }

    public var description: String { "remote-storage \(key): \(message)" }
}
