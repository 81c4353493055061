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
        let endpoint = try RemoteStorage.Endpoint(url: url)
        let options = try ChannelOptions(channelOptions)
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
