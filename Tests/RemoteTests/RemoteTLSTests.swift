import CASCore
import Foundation
import RemoteCAS
import TestSupport
import XCTest

/// RemoteStorage against a BuildGrid server with a TLS channel and JWT
/// authorization, checked with BuildGrid's own client (setup_channel).
final class RemoteTLSTests: XCTestCase {
    var tmp = ""
    var pki: TestPKI!
    var secret = ""
    var server: BuildGridServer?

    override func setUpWithError() throws {
        tmp = try makeMountTempDir("RemoteTLSTests")
        pki = try TestPKI(directory: tmp + "/pki")
        secret = tmp + "/jwt.secret"
        try writeJWTSecret(secret)
    }

    override func tearDown() {
        server?.stop()
        server = nil
        if !tmp.isEmpty { try? FileManager.default.removeItem(atPath: tmp) }
    }

    // MARK: - Helpers

    /// A TLS + JWT server; with `mutual`, it requires client certificates
    /// signed by the test CA. BuildGrid's client is set up with a good token.
    @discardableResult
    func startServer(tls: Bool = true, mutual: Bool = false, jwt: Bool = true,
                     certificate: (cert: String, key: String)? = nil) throws -> BuildGridServer {
        var security = BuildGridServer.Security()
        if tls {
            security.serverKey = certificate?.key ?? pki.serverKey
            security.serverCert = certificate?.cert ?? pki.serverCert
            if mutual { security.clientCAs = pki.caCert }
        }
        if jwt { security.jwtSecretFile = secret }
        let s = try BuildGridServer(directory: tmp + "/bgd-\(UUID().uuidString.prefix(8))", security: security)
        var args: [String] = []
        if tls { args += ["--server-cert", pki.caCert] }
        if mutual { args += ["--client-key", pki.clientKey, "--client-cert", pki.clientCert] }
        if jwt { args += ["--token-file", try tokenFile("python-token", try goodToken())] }
        s.clientCredentials = args
        server = s
        return s
    }

    func goodToken() throws -> String {
        try BuildGridVenv.get().mintJWT(secretFile: secret)
    }

    /// A token that BuildGrid's check rejects: signed with another secret.
    func badToken() throws -> String {
        let other = tmp + "/other.secret"
        try writeJWTSecret(other)
        return try BuildGridVenv.get().mintJWT(secretFile: other)
    }

    func tokenFile(_ name: String, _ token: String) throws -> String {
        let path = tmp + "/" + name
        try (token + "\n").write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    func localFile(_ data: Data) throws -> (path: String, digest: Digest) {
        try writeLocalBlob(data, in: tmp + "/src")
    }

    func uploadWithBuildGrid(_ paths: [String]) throws {
        let out = try server!.client(["upload"] + paths)
        guard out.status == 0 else { throw TestSupportError("BuildGrid client upload failed: \(out.stderr)") }
    }

    func missingPerBuildGrid(_ digests: [Digest]) throws -> [String] {
        let out = try server!.client(["missing"] + digests.map(\.description))
        guard out.status == 0 else { throw TestSupportError("BuildGrid client FindMissingBlobs failed: \(out.stderr)") }
        return out.stdout.split(separator: "\n").map(String.init)
    }

    /// Runs a blocking storage call on another thread; a call that has not
    /// returned after `hangLimit` seconds is reported as a hang (this is a
    /// hang detector, far above any deadline in these tests, not a timing check).
    func outcome<T: Sendable>(hangLimit: Double = 600, _ body: @escaping @Sendable () throws -> T) -> Result<T, Error>? {
        let box = OutcomeBox<T>()
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            box.set(Result { try body() })
            done.signal()
        }
        guard done.wait(timeout: .now() + hangLimit) == .success else { return nil }
        return box.get()
    }

    /// Asserts that `body` fails with a StorageError that is `unavailable`
    /// or EIO, and does not hang.
    func assertFailsUnavailable<T: Sendable>(_ what: String, file: StaticString = #filePath, line: UInt = #line,
                                             _ body: @escaping @Sendable () throws -> T) -> StorageError? {
        guard let r = outcome(body) else {
            XCTFail("\(what): the call hung", file: file, line: line)
            return nil
        }
        switch r {
        case .success(let v):
            XCTFail("\(what): succeeded (\(v)) but should have failed", file: file, line: line)
            return nil
        case .failure(let e):
            guard let se = e as? StorageError else {
                XCTFail("\(what): not a StorageError: \(e)", file: file, line: line)
                return nil
            }
            switch se {
            case .unavailable: break
            case .io(let code, _) where code == EIO: break
            default: XCTFail("\(what): expected unavailable or EIO, got \(se)", file: file, line: line)
            }
            return se
        }
    }

    // MARK: - Tests

    func testTLSAndTokenBothWaysWithBuildGridsClient() throws {
        let s = try startServer()
        XCTAssertTrue(s.url.hasPrefix("grpcs://"))
        let small = try localFile(randomData(3000, seed: 41))
        let large = try localFile(randomData(6 << 20 + 5, seed: 42))
        try uploadWithBuildGrid([small.path, large.path])

        let token = try tokenFile("token", try goodToken())
        let remote = try RemoteStorage(url: s.url, requestTimeout: 20, retries: 1,
                                       credentials: RemoteCredentials(tlsServerCert: pki.caCert, authToken: token))
        XCTAssertEqual(try remote.getBlob(small.digest)?.readAll(), try Data(contentsOf: URL(fileURLWithPath: small.path)))
        let largeBytes = try Data(contentsOf: URL(fileURLWithPath: large.path))
        XCTAssertEqual(try remote.getBlob(large.digest)?.readAll(), largeBytes)
        XCTAssertEqual(try remote.read(large.digest, offset: 1 << 20, length: 4096), largeBytes.subdata(in: (1 << 20)..<((1 << 20) + 4096)))

        let mine = randomData(5000, seed: 43), mineLarge = randomData(5 << 20, seed: 44)
        let dm = Digest.of(mine), dml = Digest.of(mineLarge)
        XCTAssertEqual(Set(try remote.missingBlobs([dm, dml, small.digest])), [dm, dml])
        try remote.commitWrite(dm, DataSource(mine))
        try remote.commitWrite(dml, DataSource(mineLarge))
        XCTAssertEqual(try missingPerBuildGrid([dm, dml]), [], "BuildGrid finds what RemoteStorage wrote")
        XCTAssertEqual(remote.bulkUpdateBlobs([(Digest.of(Data("x".utf8)), Data("x".utf8))]).compactMap { $0 }.count, 0)

        // https:// means TLS as grpcs:// does.
        let viaHTTPS = try RemoteStorage(url: "https://127.0.0.1:\(s.port)", requestTimeout: 20, retries: 1,
                                         credentials: RemoteCredentials(tlsServerCert: pki.caCert, authToken: token))
        XCTAssertTrue(try viaHTTPS.hasBlob(dml))

        // The server checks the token: BuildGrid's client without one is refused.
        let refused = try s.client(["missing", dm.description], credentials: ["--server-cert", pki.caCert])
        XCTAssertNotEqual(refused.status, 0, "a call without a token must be refused")
        XCTAssertTrue(refused.stderr.contains("UNAUTHENTICATED"), refused.stderr)
    }

    func testWrongTokenFailsAndTheRefreshPicksUpTheFixedFile() throws {
        let s = try startServer()
        let f = try localFile(randomData(2000, seed: 51))
        try uploadWithBuildGrid([f.path])
        let token = try tokenFile("token", try badToken())
        let creds = { (refresh: Double) in
            RemoteCredentials(tlsServerCert: self.pki.caCert, authToken: token, tokenRefreshSeconds: refresh)
        }
        // Created although the token is wrong: the server is not asked then.
        let fast = try RemoteStorage(url: s.url, requestTimeout: 5, retries: 1, maxBackoff: 2, credentials: creds(1))
        let slow = try RemoteStorage(url: s.url, requestTimeout: 5, retries: 1, maxBackoff: 2, credentials: creds(3600))

        let e = assertFailsUnavailable("read with a wrong token") { try fast.getBlob(f.digest)?.readAll() }
        XCTAssertTrue("\(e.map { "\($0)" } ?? "")".contains("credentials refused"), "\(String(describing: e))")
        _ = assertFailsUnavailable("FindMissingBlobs with a wrong token") { try fast.missingBlobs([f.digest]) }
        _ = assertFailsUnavailable("write with a wrong token") { try fast.commitWrite(Digest.of(Data("y".utf8)), DataSource(Data("y".utf8))) }
        _ = assertFailsUnavailable("read with a wrong token") { try slow.hasBlob(f.digest) }

        try (try goodToken() + "\n").write(toFile: token, atomically: true, encoding: .utf8)
        // After its 1 s refresh interval `fast` reads the file again.
        let recovered = pollUntil(60) { (try? fast.getBlob(f.digest)?.readAll()) == (try? Data(contentsOf: URL(fileURLWithPath: f.path))) }
        XCTAssertTrue(recovered, "calls succeed again once the token file is fixed")
        XCTAssertEqual(try fast.missingBlobs([f.digest]), [])
        // `slow` keeps the token it read for an hour.
        _ = assertFailsUnavailable("a token is kept for token-refresh-seconds") { try slow.hasBlob(f.digest) }
    }

    func testSystemRootsDoNotTrustAPrivateCA() throws {
        let s = try startServer()
        let token = try tokenFile("token", try goodToken())
        // Constructed fine; only the calls fail, with the certificate not trusted.
        let remote = try RemoteStorage(url: s.url, requestTimeout: 5, retries: 1, maxBackoff: 1,
                                       credentials: RemoteCredentials(authToken: token))
        let d = Digest.of(Data("hello".utf8))
        let e = assertFailsUnavailable("TLS with system roots only") { try remote.hasBlob(d) }
        XCTAssertTrue("\(e.map { "\($0)" } ?? "")".contains("certificate is not trusted"), "\(String(describing: e))")
        _ = assertFailsUnavailable("read with system roots only") { try remote.getBlob(d) }
        // The same storage set up with the CA works.
        let trusting = try RemoteStorage(url: s.url, requestTimeout: 5, retries: 1,
                                         credentials: RemoteCredentials(tlsServerCert: pki.caCert, authToken: token))
        XCTAssertEqual(try trusting.missingBlobs([d]), [d])
    }

    func testMutualTLS() throws {
        let s = try startServer(mutual: true)
        let f = try localFile(randomData(4000, seed: 61))
        try uploadWithBuildGrid([f.path])  // BuildGrid's client presents the client certificate
        let token = try tokenFile("token", try goodToken())

        let without = try RemoteStorage(url: s.url, requestTimeout: 5, retries: 1, maxBackoff: 1,
                                        credentials: RemoteCredentials(tlsServerCert: pki.caCert, authToken: token))
        let e = assertFailsUnavailable("no client certificate") { try without.getBlob(f.digest) }
        XCTAssertTrue("\(e.map { "\($0)" } ?? "")".contains("client certificate"), "\(String(describing: e))")

        let with = try RemoteStorage(url: s.url, requestTimeout: 20, retries: 1,
                                     credentials: RemoteCredentials(tlsServerCert: pki.caCert, tlsClientKey: pki.clientKey,
                                                                    tlsClientCert: pki.clientCert, authToken: token))
        XCTAssertEqual(try with.getBlob(f.digest)?.readAll(), try Data(contentsOf: URL(fileURLWithPath: f.path)))
        let mine = randomData(7000, seed: 62)
        try with.commitWrite(Digest.of(mine), DataSource(mine))
        XCTAssertEqual(try missingPerBuildGrid([Digest.of(mine)]), [])
    }

    func testMissingOrBadCredentialFilesFailConstructionNamingTheFile() throws {
        let url = "grpcs://127.0.0.1:9"  // never contacted
        let token = try tokenFile("token", "abc")
        let missing = tmp + "/no-such-file.pem"
        let notPEM = try tokenFile("not-pem", "hello")
        let blank = try tokenFile("blank", "  \n\n")
        let cases: [(String, RemoteCredentials, String)] = [
            ("credentials.tls-server-cert", RemoteCredentials(tlsServerCert: missing), missing),
            ("credentials.tls-client-key", RemoteCredentials(tlsClientKey: missing, tlsClientCert: pki.clientCert), missing),
            ("credentials.tls-client-cert", RemoteCredentials(tlsClientKey: pki.clientKey, tlsClientCert: missing), missing),
            ("credentials.auth-token", RemoteCredentials(tlsServerCert: pki.caCert, authToken: missing), missing),
            ("credentials.auth-token", RemoteCredentials(authToken: tmp), tmp),
            ("credentials.auth-token", RemoteCredentials(authToken: blank), blank),
            ("credentials.tls-server-cert", RemoteCredentials(tlsServerCert: notPEM), notPEM),
            ("credentials.tls-server-cert", RemoteCredentials(tlsServerCert: pki.caKey), pki.caKey),
            ("credentials.tls-client-cert", RemoteCredentials(tlsClientKey: pki.clientKey), "tls-client-key"),
            ("credentials.tls-client-key", RemoteCredentials(tlsClientKey: pki.clientKey, tlsClientCert: pki.serverCert), pki.clientKey),
            ("credentials.token-refresh-seconds", RemoteCredentials(authToken: token, tokenRefreshSeconds: -1), "at least 0"),
        ]
        for (key, creds, mention) in cases {
            XCTAssertThrowsError(try RemoteStorage(url: url, credentials: creds), "\(key) \(creds)") { e in
                guard let se = e as? RemoteSetupError else { return XCTFail("\(key): \(e)") }
                XCTAssertEqual(se.key, key, "\(se)")
                XCTAssertTrue(se.description.contains(mention), "\(se) should name \(mention)")
            }
        }
        // An unreadable (mode 000) file: root reads anything, so only when not root.
        if getuid() != 0 {
            let locked = try tokenFile("locked", "abc")
            chmod(locked, 0)
            XCTAssertThrowsError(try RemoteStorage(url: url, credentials: RemoteCredentials(authToken: locked))) { e in
                XCTAssertTrue("\(e)".contains(locked), "\(e)")
            }
        }
        // All files present: constructed, nothing contacted.
        XCTAssertNoThrow(try RemoteStorage(url: url, credentials: RemoteCredentials(
            tlsServerCert: pki.caCert, tlsClientKey: pki.clientKey, tlsClientCert: pki.clientCert, authToken: token)))
    }

    func testPlaintextURLIgnoresTLSFilesButSendsTheToken() throws {
        let s = try startServer(tls: false, jwt: true)
        XCTAssertTrue(s.url.hasPrefix("grpc://"))
        let f = try localFile(randomData(1500, seed: 71))
        try uploadWithBuildGrid([f.path])
        let token = try tokenFile("token", try goodToken())
        // As in BuildGrid: TLS files on a plaintext URL are ignored, even missing ones.
        let remote = try RemoteStorage(url: s.url, requestTimeout: 20, retries: 1, credentials: RemoteCredentials(
            tlsServerCert: tmp + "/absent.pem", authToken: token))
        XCTAssertEqual(try remote.getBlob(f.digest)?.readAll(), try Data(contentsOf: URL(fileURLWithPath: f.path)))
        let noToken = try RemoteStorage(url: s.url, requestTimeout: 5, retries: 0)
        _ = assertFailsUnavailable("no token") { try noToken.hasBlob(f.digest) }
    }

    func testChannelOptionsAgainstTheServer() throws {
        let s = try startServer()
        let token = try tokenFile("token", try goodToken())
        let creds = RemoteCredentials(tlsServerCert: pki.caCert, authToken: token)
        let f = try localFile(randomData(5000, seed: 81))
        try uploadWithBuildGrid([f.path])

        let tuned = try RemoteStorage(url: s.url, requestTimeout: 20, retries: 1, credentials: creds, channelOptions: [
            "keepalive-time-ms": "10000", "keepalive-timeout-ms": "5000", "keepalive-permit-without-calls": "1",
            "max-send-message-length": "65536", "client-idle-timeout-ms": "60000",
            "initial-reconnect-backoff-ms": "200", "max-reconnect-backoff-ms": "2000",
            "ssl-target-name-override": "localhost", "lb-policy-name": "round_robin",
        ])
        XCTAssertEqual(tuned.channelOptions.ignored, ["lb-policy-name"])
        XCTAssertEqual(tuned.chunkSize, 65536 - 4096)
        XCTAssertEqual(try tuned.getBlob(f.digest)?.readAll(), try Data(contentsOf: URL(fileURLWithPath: f.path)))
        // Small sends: a 1 MiB blob goes in chunks under 64 KiB, 20 small blobs in several batches.
        let big = randomData(1 << 20, seed: 82)
        try tuned.commitWrite(Digest.of(big), DataSource(big))
        let smalls = (0..<20).map { i -> (Digest, Data) in let d = randomData(10_000, seed: 90 + UInt64(i)); return (Digest.of(d), d) }
        XCTAssertEqual(tuned.bulkUpdateBlobs(smalls).compactMap { $0 }.count, 0)
        XCTAssertEqual(try missingPerBuildGrid([Digest.of(big)] + smalls.map(\.0)), [])
        XCTAssertEqual(try tuned.bulkReadBlobs(smalls.map(\.0)).count, smalls.count)

        // The receive limit is applied: a 5000-byte blob does not fit in 1000 bytes.
        let tight = try RemoteStorage(url: s.url, requestTimeout: 10, retries: 0, credentials: creds,
                                      channelOptions: ["max-receive-message-length": "1000"])
        XCTAssertThrowsError(try tight.getBlob(f.digest))
    }

    /// `ssl-target-name-override` / `default-authority` set the name the
    /// server's certificate is checked against. (NIOSSL also accepts a
    /// certificate whose IP address entry is the peer's address, whatever
    /// the name, so this server's certificate names only DNS:localhost.)
    func testTLSNameOverride() throws {
        let named = try pki.issueServerCertificate(name: "dns-only", subjectAltName: "DNS:localhost")
        let s = try startServer(certificate: named)
        let token = try tokenFile("token", try goodToken())
        let creds = RemoteCredentials(tlsServerCert: pki.caCert, authToken: token)
        let d = Digest.of(Data("name check".utf8))

        let byAddress = try RemoteStorage(url: s.url, requestTimeout: 5, retries: 0, credentials: creds)
        let e = assertFailsUnavailable("127.0.0.1 is not a name in the certificate") { try byAddress.hasBlob(d) }
        XCTAssertTrue("\(e.map { "\($0)" } ?? "")".contains("does not name 127.0.0.1"), "\(String(describing: e))")
        let overridden = try RemoteStorage(url: s.url, requestTimeout: 20, retries: 0, credentials: creds,
                                           channelOptions: ["ssl-target-name-override": "localhost"])
        XCTAssertEqual(try overridden.missingBlobs([d]), [d])
        let authority = try RemoteStorage(url: s.url, requestTimeout: 20, retries: 0, credentials: creds,
                                          channelOptions: ["default-authority": "localhost"])
        XCTAssertEqual(try authority.missingBlobs([d]), [d])
        let wrongName = try RemoteStorage(url: s.url, requestTimeout: 5, retries: 0, credentials: creds,
                                          channelOptions: ["default-authority": "not-the-server.example"])
        _ = assertFailsUnavailable("a name the certificate does not carry") { try wrongName.hasBlob(d) }
        // By name, without any option.
        let byName = try RemoteStorage(url: "grpcs://localhost:\(s.port)", requestTimeout: 20, retries: 0, credentials: creds)
        XCTAssertEqual(try byName.missingBlobs([d]), [d])
    }

    func testChannelOptionErrors() throws {
        let url = "grpc://127.0.0.1:9"
        for (options, key) in [
            (["keepalive-time": "10"], "channel-options.keepalive-time"),
            (["keepalive_time_ms": "10"], "channel-options.keepalive_time_ms"),
            (["http2.max_frame_size": "16384"], "channel-options.http2.max_frame_size"),
            (["keepalive-time-ms": "soon"], "channel-options.keepalive-time-ms"),
            (["max-receive-message-length": "-2"], "channel-options.max-receive-message-length"),
            (["max-send-message-length": "100"], "channel-options.max-send-message-length"),
            (["keepalive-permit-without-calls": "2"], "channel-options.keepalive-permit-without-calls"),
            (["default-compression-algorithm": "zstd"], "channel-options.default-compression-algorithm"),
        ] {
            XCTAssertThrowsError(try RemoteStorage(url: url, channelOptions: options), "\(options)") { e in
                XCTAssertEqual((e as? RemoteSetupError)?.key, key, "\(e)")
            }
        }
        let o = try ChannelOptions(["max-receive-message-length": "-1", "keepalive-time-ms": "2147483647",
                                    "enable-retries": "0", "primary-user-agent": "x", "default-compression-algorithm": "gzip"])
        XCTAssertEqual(o.maxReceiveMessageBytes, Int(UInt32.max))
        XCTAssertNil(o.keepaliveTime, "INT_MAX turns keepalive off, as in gRPC")
        XCTAssertEqual(o.ignored, ["enable-retries", "primary-user-agent"])
        XCTAssertEqual(o.compression, .gzip)
        for (key, value) in [("request-timeout", 0.0), ("request-timeout", -1), ("request-timeout", .infinity)] {
            XCTAssertThrowsError(try RemoteStorage(url: url, requestTimeout: value)) { e in
                XCTAssertEqual((e as? RemoteSetupError)?.key, key, "\(e)")
            }
        }
        XCTAssertThrowsError(try RemoteStorage(url: url, maxBackoff: -1)) { e in
            XCTAssertEqual((e as? RemoteSetupError)?.key, "max-backoff", "\(e)")
        }
        XCTAssertThrowsError(try RemoteStorage(url: url, retries: Int.max)) { e in
            XCTAssertEqual((e as? RemoteSetupError)?.key, "retries", "\(e)")
        }
    }

    func testBuildGridOffersNoCompressors() throws {
        let s = try startServer()
        let token = try tokenFile("token", try goodToken())
        let remote = try RemoteStorage(url: s.url, requestTimeout: 20, retries: 1,
                                       credentials: RemoteCredentials(tlsServerCert: pki.caCert, authToken: token))
        let data = randomData(100, seed: 99)
        try remote.commitWrite(Digest.of(data), DataSource(data))  // asks GetCapabilities first
        let out = try s.client(["capabilities"])
        XCTAssertEqual(out.status, 0, out.stderr)
        let lines = out.stdout.split(separator: "\n")
        XCTAssertEqual(lines.first.flatMap { Int($0) }, 4 << 20 - 1024, "BuildGrid's max_batch_total_size_bytes")
        XCTAssertEqual(lines.count, 1, "BuildGrid 0.8 lists no compressors: \(out.stdout)")
        XCTAssertEqual(remote.serverCompressors, [])
    }
}

/// BuildGrid's back-off between retries.
final class RetryBackoffTests: XCTestCase {
    func testBuildGridsFormula() throws {
        let b = try RetryBackoff(retries: 5, maxBackoff: 6)
        XCTAssertEqual(b.delay(afterAttempt: 1, jitter: 0.5), 1.5)
        XCTAssertEqual(b.delay(afterAttempt: 2, jitter: 0.25), 2.25)
        XCTAssertEqual(b.delay(afterAttempt: 3, jitter: 0.9), 4.9)
        XCTAssertEqual(b.delay(afterAttempt: 4, jitter: 0), 6, "capped at max-backoff")
        XCTAssertEqual(b.delay(afterAttempt: 5000, jitter: 0.3), 6)
        XCTAssertEqual(b.worstCaseTotalDelay, 22)  // 2 + 3 + 5 + 6 + 6
        let d = try RetryBackoff()
        XCTAssertEqual(d.retries, 3)
        XCTAssertEqual(d.maxBackoff, 64)
        XCTAssertEqual(d.worstCaseTotalDelay, 10)  // 2 + 3 + 5
        let uncapped: Double = 2 + 3 + 5 + 9 + 17 + 33  // 2^(n-1) + 1 for n = 1...6; from n = 7 on, 64
        XCTAssertEqual(try RetryBackoff(retries: 10_000, maxBackoff: 64).worstCaseTotalDelay, uncapped + 64 * 9_994)
        XCTAssertEqual(RetryBackoff.none.retries, 0)
        XCTAssertEqual(try RetryBackoff(retries: -3).retries, 0)
    }
}

private final class OutcomeBox<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Result<T, Error>?
    func set(_ v: Result<T, Error>) { lock.lock(); value = v; lock.unlock() }
    func get() -> Result<T, Error>? { lock.lock(); defer { lock.unlock() }; return value }
}
