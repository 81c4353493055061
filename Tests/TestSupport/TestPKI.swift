import Foundation

/// A throw-away certificate authority made with `openssl` under `directory`:
/// a server certificate for 127.0.0.1 / localhost and a client certificate,
/// both signed by it (PEM files, unencrypted keys).
public struct TestPKI: Sendable {
    public let directory: String
    public var caCert: String { directory + "/ca.crt" }
    public var caKey: String { directory + "/ca.key" }
    public var serverCert: String { directory + "/server.crt" }
    public var serverKey: String { directory + "/server.key" }
    public var clientCert: String { directory + "/client.crt" }
    public var clientKey: String { directory + "/client.key" }

    public init(directory: String) throws {
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let d = shq(directory)
        let script = """
            set -e
            cd \(d)
            openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=casfs-test-ca \
                -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
            openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost
            printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\nkeyUsage=digitalSignature,keyEncipherment\\nextendedKeyUsage=serverAuth\\n' > server.ext
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile server.ext
            openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=casfs-test-client
            printf 'basicConstraints=CA:FALSE\\nkeyUsage=digitalSignature,keyEncipherment\\nextendedKeyUsage=clientAuth\\n' > client.ext
            openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 2 -extfile client.ext
            """
        let r = runShell(script)
        guard r.ok else { throw TestSupportError("making test certificates with openssl failed: \(r)") }
    }

    /// Another server certificate from this CA, with the given
    /// subjectAltName (e.g. "DNS:localhost"); returns (certificate, key) paths.
    public func issueServerCertificate(name: String, subjectAltName: String) throws -> (cert: String, key: String) {
        let d = shq(directory), n = shq(name)
        let script = """
            set -e
            cd \(d)
            openssl req -newkey rsa:2048 -nodes -keyout \(n).key -out \(n).csr -subj /CN=\(n)
            printf 'subjectAltName=%s\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' \(shq(subjectAltName)) > \(n).ext
            openssl x509 -req -in \(n).csr -CA ca.crt -CAkey ca.key -CAcreateserial -out \(n).crt -days 2 -extfile \(n).ext
            """
        let r = runShell(script)
        guard r.ok else { throw TestSupportError("issuing \(name) with openssl failed: \(r)") }
        return (directory + "/\(name).crt", directory + "/\(name).key")
    }
}

extension BuildGridVenv {
    /// An HS256 JWT for BuildGrid's `authorization: {method: jwt}`, made
    /// with the venv's PyJWT: subject `sub`, expiring after `lifetime` s.
    public func mintJWT(secretFile: String, subject: String = "casfs-test", lifetime: Int = 3600) throws -> String {
        let code = """
            import sys, time, jwt
            secret = open(sys.argv[1]).read().strip()
            print(jwt.encode({"sub": sys.argv[2], "exp": int(time.time()) + int(sys.argv[3])}, secret, algorithm="HS256"))
            """
        let out = try run(code: code, arguments: [secretFile, subject, String(lifetime)])
        guard out.status == 0 else { throw TestSupportError("minting a JWT failed: \(out.stderr)") }
        return out.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// Writes a random HMAC secret (base64 text, as BuildGrid's `secret:` file
/// holds it) to `path`.
public func writeJWTSecret(_ path: String) throws {
    var bytes = [UInt8](repeating: 0, count: 32)
    for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255) }
    try (Data(bytes).base64EncodedString() + "\n").write(toFile: path, atomically: true, encoding: .utf8)
}
