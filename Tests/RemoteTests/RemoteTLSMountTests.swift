import CASCore
import Foundation
import TestSupport
import XCTest

/// casfs mounts whose fallback is a live BuildGrid server with a TLS channel
/// (a throw-away CA made with openssl) and JWT authorization, configured
/// only through `!remote-storage`'s YAML keys and driven with shell tools.
/// BuildGrid's own client (Tests/python/reapi_client.py, TLS and a token)
/// is the other side.
final class RemoteTLSMountTests: XCTestCase {
    var tmp = ""
    var pki: TestPKI!
    var secret = ""
    var server: BuildGridServer!
    var mounts: [CasfsMount] = []

    override func setUpWithError() throws {
        try requireFuse()
        _ = try casfsBinary()
        tmp = try makeMountTempDir("RemoteTLSMountTests")
        pki = try TestPKI(directory: tmp + "/pki")
        secret = tmp + "/jwt.secret"
        try writeJWTSecret(secret)
        server = try BuildGridServer(directory: tmp + "/bgd", security: BuildGridServer.Security(
            serverKey: pki.serverKey, serverCert: pki.serverCert, jwtSecretFile: secret))
        server.clientCredentials = ["--server-cert", pki.caCert, "--token-file", try tokenFile("python-token", try goodToken())]
    }

    override func tearDown() {
        for m in mounts { m.unmount() }
        mounts = []
        server?.stop()
        server = nil
        if !tmp.isEmpty { try? FileManager.default.removeItem(atPath: tmp) }
    }

    // MARK: - Helpers

    var httpsURL: String { "https://127.0.0.1:\(server.port)" }

    func goodToken() throws -> String { try BuildGridVenv.get().mintJWT(secretFile: secret) }

    /// A token BuildGrid refuses: signed with another secret.
    func badToken() throws -> String {
        let other = tmp + "/other.secret"
        try writeJWTSecret(other)
        return try BuildGridVenv.get().mintJWT(secretFile: other)
    }

    @discardableResult
    func tokenFile(_ name: String, _ token: String) throws -> String {
        let path = tmp + "/" + name
        try (token + "\n").write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// `!with-cache-storage` (lru) over `!remote-storage` at the https:// URL.
    /// `serverCert` nil: no `tls-server-cert` (the system's roots).
    func config(token: String, serverCert: String?, writable: Bool = false, refresh: String = "60",
                extra: String = "") -> String {
        """
        storage: !with-cache-storage
          cache: !lru-storage
            size: 64M
          fallback: !remote-storage
            url: \(httpsURL)
            request-timeout: 20s
            retries: 1
            max-backoff: 1
            credentials:
        \(serverCert.map { "      tls-server-cert: \($0)\n" } ?? "")      auth-token: \(token)
              token-refresh-seconds: \(refresh)
        \(extra)
        mount:
          writable: \(writable)

        """
    }

    func mount(_ config: String, name: String = "m") throws -> CasfsMount {
        let dir = tmp + "/" + name
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let m = try CasfsMount(root: dir, config: config)
        mounts.append(m)
        return m
    }

    func localFile(_ data: Data) throws -> (path: String, digest: Digest) {
        try writeLocalBlob(data, in: tmp + "/src")
    }

    func uploadWithBuildGrid(_ paths: [String]) throws {
        let out = try server.client(["upload"] + paths)
        guard out.status == 0 else { throw TestSupportError("BuildGrid's client could not upload: \(out.stderr)") }
    }

    func missingPerBuildGrid(_ digests: [Digest]) throws -> [String] {
        let out = try server.client(["missing"] + digests.map(\.description))
        guard out.status == 0 else { throw TestSupportError("BuildGrid's client FindMissingBlobs failed: \(out.stderr)") }
        return out.stdout.split(separator: "\n").map(String.init)
    }

    func readPerBuildGrid(_ d: Digest) throws -> Data {
        let path = tmp + "/bg-read-\(UUID().uuidString)"
        let out = try server.client(["read", d.description, path])
        guard out.status == 0 else { throw TestSupportError("BuildGrid's client ByteStream Read failed: \(out.stderr)") }
        return try Data(contentsOf: URL(fileURLWithPath: path))
    }

    @discardableResult
    func mustSh(_ cmd: String, file: StaticString = #filePath, line: UInt = #line) -> String {
        let r = runShell(cmd)
        XCTAssertTrue(r.ok, "\(cmd): \(r)", file: file, line: line)
        return r.stdout
    }

    /// Asserts that reading `path` fails with EIO and returns (`timeout 120`
    /// is only a hang guard: status 124 means the read hung).
    func assertReadFailsWithEIO(_ path: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        let r = runShell("timeout 120 cat \(shq(path)) > /dev/null")
        XCTAssertNotEqual(r.status, 124, "\(what): the read hung", file: file, line: line)
        XCTAssertFalse(r.ok, "\(what): the read succeeded", file: file, line: line)
        XCTAssertTrue(r.stderr.contains("Input/output error"), "\(what): \(r)", file: file, line: line)
    }

    // MARK: - Tests

    func testBlobsBothWaysOverTLSWithAToken() throws {
        let token = try tokenFile("token", try goodToken())
        let small = try localFile(randomData(3000, seed: 1))
        let large = try localFile(randomData(5 << 20 + 7, seed: 2))
        try uploadWithBuildGrid([small.path, large.path])
        let m = try mount(config(token: token, serverCert: pki.caCert, writable: true, extra: """
                channel-options:
                  keepalive-time-ms: 30000
                  keepalive-permit-without-calls: 1
                  max-send-message-length: 1048576
                  initial-reconnect-backoff-ms: 200
            """))

        for f in [small, large] {
            XCTAssertEqual(mustSh("timeout 120 sha256sum < \(shq(m.path(f.digest)))").prefix(64), Substring(f.digest.hash),
                           "sha256sum through the mount")
            mustSh("timeout 120 cmp \(shq(f.path)) \(shq(m.path(f.digest)))")
        }

        let mineSmall = try localFile(randomData(4000, seed: 3))
        let mineLarge = try localFile(randomData(6 << 20 + 3, seed: 4))
        XCTAssertEqual(Set(try missingPerBuildGrid([mineSmall.digest, mineLarge.digest])),
                       [mineSmall.digest.description, mineLarge.digest.description])
        for f in [mineSmall, mineLarge] { mustSh("timeout 120 cp \(shq(f.path)) \(shq(m.path(f.digest)))") }
        XCTAssertEqual(try missingPerBuildGrid([mineSmall.digest, mineLarge.digest]), [], "BuildGrid finds what cp wrote")
        XCTAssertEqual(try readPerBuildGrid(mineLarge.digest), try Data(contentsOf: URL(fileURLWithPath: mineLarge.path)))
    }

    func testWrongTokenFailsReadsUntilTheFileIsFixedWithoutARemount() throws {
        let f = try localFile(randomData(20_000, seed: 5))
        try uploadWithBuildGrid([f.path])
        let token = try tokenFile("token", try badToken())
        // The mount comes up: the token is not checked before the first call.
        let m = try mount(config(token: token, serverCert: pki.caCert, refresh: "1"))
        let pid = m.pid
        assertReadFailsWithEIO(m.path(f.digest), "a read with a refused token")
        assertReadFailsWithEIO(m.path(f.digest), "a second read with a refused token")
        XCTAssertTrue(m.log.contains("credentials refused"), m.log.suffix(3000).description)

        try (try goodToken() + "\n").write(toFile: token, atomically: true, encoding: .utf8)
        let recovered = pollUntil(120) { runShell("timeout 120 cmp \(shq(f.path)) \(shq(m.path(f.digest)))").ok }
        XCTAssertTrue(recovered, "reads succeed once the token file is fixed; log:\n\(m.log.suffix(3000))")
        XCTAssertEqual(m.pid, pid, "the same mount")
        XCTAssertTrue(m.isRunning)
        XCTAssertTrue(m.log.contains("auth token re-read from \(token)"), m.log.suffix(3000).description)
    }

    func testSystemRootsDoNotTrustThePrivateCA() throws {
        let f = try localFile(randomData(1000, seed: 6))
        try uploadWithBuildGrid([f.path])
        let token = try tokenFile("token", try goodToken())
        let m = try mount(config(token: token, serverCert: nil))
        assertReadFailsWithEIO(m.path(f.digest), "a read with the system's roots only")
        XCTAssertTrue(m.isRunning)
        XCTAssertTrue(m.log.contains("certificate is not trusted"), m.log.suffix(3000).description)
    }

    func testMissingCredentialFileFailsTheMountInOneLineNamingIt() throws {
        let token = try tokenFile("token", try goodToken())
        let absent = tmp + "/absent/file.pem"
        for (name, yaml) in [
            ("auth-token", config(token: absent, serverCert: pki.caCert)),
            ("tls-server-cert", config(token: token, serverCert: absent)),
        ] {
            let dir = tmp + "/missing-\(name)"
            try FileManager.default.createDirectory(atPath: dir + "/mnt", withIntermediateDirectories: true)
            try yaml.write(toFile: dir + "/casfs.yaml", atomically: true, encoding: .utf8)
            let r = runShell("timeout 120 \(shq(try casfsBinary())) mount --config \(shq(dir + "/casfs.yaml")) --log-file \(shq(dir + "/log")) \(shq(dir + "/mnt"))")
            XCTAssertNotEqual(r.status, 124, "\(name): casfs mount hung")
            XCTAssertFalse(r.ok, "\(name): casfs mount succeeded without its credential file")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, "\(name): one line: \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(absent), "\(name): names the file: \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("credentials.\(name)"), "\(name): names the key: \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("casfs.yaml:"), "\(name): names the config file: \(r.stderr)")
            XCTAssertFalse(isFuseMounted(dir + "/mnt"))
        }
    }
}
