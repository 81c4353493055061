import GRPCCore
import GRPCNIOTransportHTTP2

/// A gRPC client for services beside the CAS (the Bots API of `casfs
/// worker`) on the same terms as `RemoteStorage`: the URL forms, TLS from
/// the credential files, the bearer token and the channel options of
/// `!remote-storage`, and the request metadata BuildGrid's own client sends.
public enum RemoteChannel {
    public typealias Transport = HTTP2ClientTransport.Posix

    /// A client for `url`; run its connections with `runConnections()`
    /// and stop it with `beginGracefulShutdown()`. Every credential file is
    /// read here (a missing one throws `RemoteSetupError`).
    public static func client(url: String, credentials: RemoteCredentials = .none,
                              channelOptions: [String: String] = [:],
                              toolName: String = "casfs") throws -> GRPCClient<Transport> {
        try client(RemoteStorage.Endpoint(url: url), credentials: credentials,
                   options: ChannelOptions(channelOptions), toolName: toolName)
    }

    /// The client for `endpoint`, with its transport, bearer token and the
    /// request metadata (as `client(url:…)`; options already parsed).
    static func client(_ endpoint: RemoteStorage.Endpoint, credentials: RemoteCredentials,
                       options: ChannelOptions, toolName: String = "casfs") throws -> GRPCClient<Transport> {
        let token = try credentials.authToken.map {
            try AuthTokenFile(path: $0, refreshSeconds: credentials.refreshInterval())
        }
        if token != nil && !endpoint.secure {
            log.warning("\(endpoint) is a plaintext URL: the auth token is sent unencrypted")
        }
        options.logIgnored()
        let transport = try RemoteTransport.make(endpoint, credentials: credentials, options: options)
        return GRPCClient(transport: transport, interceptors: [CallMetadataInterceptor(token: token, toolName: toolName)])
    }
}
