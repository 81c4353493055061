import GRPCCore
import GRPCNIOTransportHTTP2

/// Builds the HTTP/2 transport for an endpoint: the target, TLS from the
/// credential files, and the channel options.
enum RemoteTransport {
    typealias Posix = HTTP2ClientTransport.Posix

    static func make(_ endpoint: RemoteStorage.Endpoint, credentials: RemoteCredentials,
                     options: ChannelOptions) throws -> Posix {
        var config = Posix.Config.defaults { c in
            // Reconnect soon after a server comes back rather than after minutes.
            c.backoff = .init(initial: .milliseconds(100), max: .seconds(1), multiplier: 1.6, jitter: 0.2)
            c.http2.targetWindowSize = 8 << 20
        }
        options.apply(to: &config)
        let security = try security(for: endpoint, credentials)
        do {
            return try Posix(target: target(endpoint), transportSecurity: security, config: config)
        } catch {
            throw diagnose(endpoint, credentials, error)
        }
    }

    static func target(_ endpoint: RemoteStorage.Endpoint) -> any ResolvableTarget {
        if endpoint.host.contains(":") {
            return .ipv6(address: endpoint.host, port: endpoint.port)
        } else if endpoint.host.split(separator: ".").count == 4, endpoint.host.allSatisfy({ $0.isNumber || $0 == "." }) {
            return .ipv4(address: endpoint.host, port: endpoint.port)
        }
        return .dns(host: endpoint.host, port: endpoint.port)
    }

    /// TLS for `https://` / `grpcs://`: the server checked against
    /// `tls-server-cert` (else the system's roots), a client certificate when
    /// both `tls-client-key` and `tls-client-cert` are given. Every file is
    /// read here, so a missing one fails now and names itself.
    static func security(for endpoint: RemoteStorage.Endpoint, _ c: RemoteCredentials) throws -> Posix.TransportSecurity {
        guard endpoint.secure else {
            if c.hasTLSFiles {
                log.warning("\(endpoint) is a plaintext URL: the TLS files in its credentials are ignored (use https:// or grpcs:// for TLS)")
            }
            return .plaintext
        }
        var tls = Posix.TransportSecurity.TLS.defaults
        if let path = c.tlsServerCert {
            let pem = try CredentialFile.readPEM(path, key: "credentials.tls-server-cert", kind: "CERTIFICATE")
            tls.trustRoots = .certificates([.bytes(pem, format: .pem)])
        } else {
            log.info("\(endpoint): no tls-server-cert; the server's certificate is checked against the system's roots")
        }
        switch (c.tlsClientKey, c.tlsClientCert) {
        case (nil, nil):
            break
        case let (key?, cert?):
            let keyPEM = try CredentialFile.readPEM(key, key: "credentials.tls-client-key", kind: "PRIVATE KEY")
            let certPEM = try CredentialFile.readPEM(cert, key: "credentials.tls-client-cert", kind: "CERTIFICATE")
            tls.privateKey = .bytes(keyPEM, format: .pem)
            tls.certificateChain = [.bytes(certPEM, format: .pem)]
        case (_?, nil):
            throw RemoteSetupError(key: "credentials.tls-client-cert", "missing: tls-client-key is given, and a client key needs its certificate")
        case (nil, _?):
            throw RemoteSetupError(key: "credentials.tls-client-key", "missing: tls-client-cert is given, and a client certificate needs its private key")
        }
        return .tls(tls)
    }

    /// A plain-words reason for a failed connection, from the transport's
    /// cause (NIOSSL and BoringSSL errors), or nil.
    static func explain(cause: String, _ endpoint: RemoteStorage.Endpoint, _ c: RemoteCredentials) -> String? {
        guard endpoint.secure else { return nil }
        if cause.contains("CERTIFICATE_VERIFY_FAILED") {
            return c.tlsServerCert == nil
                ? "the server's certificate is not trusted by the system's roots (set credentials.tls-server-cert)"
                : "the server's certificate is not trusted by credentials.tls-server-cert"
        }
        if cause.contains("failedToValidateHostname") {
            return "the server's certificate does not name \(endpoint.host) (or the authority set in channel-options)"
        }
        if cause.contains("uncleanShutdown") || cause.contains("handshakeFailed") {
            return c.tlsClientCert == nil
                ? "the TLS handshake failed; the server may require a client certificate (credentials.tls-client-key and tls-client-cert)"
                : "the TLS handshake failed; the server may not accept the client certificate"
        }
        if cause.contains("WRONG_VERSION_NUMBER") {
            return "the server does not speak TLS (use a grpc:// or http:// URL)"
        }
        return nil
    }

    /// The transport rejected the TLS material: find which file by trying
    /// each part alone.
    private static func diagnose(_ endpoint: RemoteStorage.Endpoint, _ c: RemoteCredentials, _ error: Error) -> Error {
        guard endpoint.secure, c.hasTLSFiles else { return error }
        let cause = (error as? RuntimeError)?.cause.map { "\($0)" } ?? "\(error)"
        func rejected(_ security: Posix.TransportSecurity) -> Bool {
            (try? Posix(target: target(endpoint), transportSecurity: security)) == nil
        }
        if let path = c.tlsServerCert, let pem = try? CredentialFile.read(path, key: "") {
            let alone = Posix.TransportSecurity.tls { $0.trustRoots = .certificates([.bytes(pem, format: .pem)]) }
            if rejected(alone) {
                return RemoteSetupError(key: "credentials.tls-server-cert", "'\(path)' holds no usable certificate: \(cause)")
            }
        }
        if let key = c.tlsClientKey, let cert = c.tlsClientCert {
            return RemoteSetupError(key: "credentials.tls-client-key",
                                    "'\(key)' with certificate '\(cert)' is not a usable key pair (unreadable PEM, or the key does not match the certificate): \(cause)")
        }
        return RemoteSetupError(key: "credentials", "TLS set-up failed: \(cause)")
    }
}
