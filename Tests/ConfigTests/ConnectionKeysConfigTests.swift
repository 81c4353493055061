import CASConfig
import CASCore
import CASStorage
import Foundation
import Redis
import RemoteCAS
import TestSupport
import XCTest

/// Expects `yaml` to fail with an error that starts with `t.yaml:<line>:`
/// (the line of the first line of `yaml` containing `lineMarker`; no line
/// when nil), names `key` and contains `mention`, all on one line.
private func assertConfigError(_ yaml: String, key: String, lineMarker: String?, mention: String = "",
                               environment: [String: String] = [:],
                               file: StaticString = #filePath, line: UInt = #line) {
    do {
        let spec = try ConfigParser.parse(yaml: yaml, source: "t.yaml", environment: environment)
        let stack = try StackBuilder().build(spec, withAccessTimes: false)
        XCTFail("accepted:\n\(yaml)\nbuilt \(type(of: stack.storage))", file: file, line: line)
    } catch {
        let text = "\(error)"
        XCTAssertTrue(error is ConfigError, "not a ConfigError: \(text)", file: file, line: line)
        XCTAssertFalse(text.contains("\n"), "one line: \(text)", file: file, line: line)
        XCTAssertTrue(text.contains(": \(key): "), "\(text) should name \(key)", file: file, line: line)
        XCTAssertTrue(text.contains(mention), "\(text) should mention \(mention)", file: file, line: line)
        if let lineMarker {
            let lines = yaml.split(separator: "\n", omittingEmptySubsequences: false)
            guard let i = lines.firstIndex(where: { $0.contains(lineMarker) }) else {
                return XCTFail("no line with \(lineMarker)", file: file, line: line)
            }
            XCTAssertTrue(text.hasPrefix("t.yaml:\(i + 1): "), "\(text) should start with t.yaml:\(i + 1):", file: file, line: line)
        } else {
            XCTAssertTrue(text.hasPrefix("t.yaml: ") || text.hasPrefix("t.yaml:"), text, file: file, line: line)
        }
    }
}

/// `!redis-connection`'s Sentinel, DNS SRV, retry and durable-write keys:
/// parsed into the spec, built into the pool's `RedisConfig`, and every
/// mistake named by file, line and key. Nothing here connects.
final class RedisConnectionConfigTests: XCTestCase {
    func parse(_ yaml: String, environment: [String: String] = [:]) throws -> (RedisSpec, RedisConfig) {
        let spec = try ConfigParser.parse(yaml: yaml, source: "t.yaml", environment: environment)
        guard case .redisIndex(_, let r, _) = spec.storage.kind else {
            throw TestSupportError("storage is not a !redis-index")
        }
        let stack = try StackBuilder().build(spec, withAccessTimes: false)
        let index = try XCTUnwrap(stack.index)
        return (r, index.redis.config)
    }

    /// A `!redis-index` over a memory store with these `!redis-connection` keys.
    func indexYAML(_ keys: String) -> String {
        let indented = keys.split(separator: "\n").map { "    " + $0 }.joined(separator: "\n")
        return """
            storage: !redis-index
              redis: !redis-connection
            \(indented)
              storage: !lru-storage
                size: 1M

            """
    }

    func testEverySentinelAndDurableKeyReachesTheRedisConfig() throws {
        let (spec, c) = try parse(indexYAML("""
            sentinel-master-name: cas-master
            sentinels:
              - 127.0.0.1:26380
              - "[::1]:26381"
              - sentinel.example
            password: pw
            db: 2
            retries: 5
            durable-replicas: 2
            durable-timeout: 1.5s
            durable-shortfall: fail
            read-from-replicas: yes
            """))
        XCTAssertEqual(spec.sentinelMasterName, "cas-master")
        XCTAssertEqual(spec.sentinels, ["127.0.0.1:26380", "[::1]:26381", "sentinel.example"])
        XCTAssertEqual(spec.retries, 5)
        XCTAssertEqual(spec.durableReplicas, 2)
        XCTAssertEqual(spec.durableTimeout, 1.5)
        XCTAssertEqual(spec.durableShortfall, "fail")
        XCTAssertTrue(spec.readFromReplicas)

        XCTAssertEqual(c.sentinelMasterName, "cas-master")
        XCTAssertEqual(c.sentinels, [RedisHostPort(host: "127.0.0.1", port: 26380), RedisHostPort(host: "::1", port: 26381),
                                     RedisHostPort(host: "sentinel.example", port: 26379)], "a sentinel without a port is on 26379")
        XCTAssertNil(c.dnsSRVRecord)
        XCTAssertEqual(c.password, "pw")
        XCTAssertEqual(c.db, 2)
        XCTAssertEqual(c.retries, 5)
        XCTAssertEqual(c.durableReplicas, 2)
        XCTAssertEqual(c.durableTimeout, 1.5)
        XCTAssertEqual(c.durableShortfall, .fail)
        XCTAssertTrue(c.readFromReplicas)
        XCTAssertEqual(c.endpoint, "sentinel:cas-master@127.0.0.1:26380,[::1]:26381,sentinel.example:26379/2")
    }

    func testHostAndPortNameTheSentinelAsInBuildGrid() throws {
        let (_, c) = try parse(indexYAML("host: 127.0.0.1\nport: 26999\nsentinel-master-name: m"))
        XCTAssertEqual(c.sentinels, [RedisHostPort(host: "127.0.0.1", port: 26999)])
        XCTAssertEqual(c.sentinelMasterName, "m")
        XCTAssertEqual(c.endpoint, "sentinel:m@127.0.0.1:26999")
        let (_, noPort) = try parse(indexYAML("host: sentinel.example\nsentinel-master-name: m"))
        XCTAssertEqual(noPort.sentinels, [RedisHostPort(host: "sentinel.example", port: 26379)])
    }

    func testDNSSRVRecordForTheServerAndForTheSentinels() throws {
        let (spec, c) = try parse(indexYAML("""
            dns-srv-record: _redis._tcp.cas.example
            dns-servers: ["127.0.0.1:5353", "[::1]"]
            retries: 0
            """))
        XCTAssertEqual(spec.dnsSRVRecord, "_redis._tcp.cas.example")
        XCTAssertEqual(c.dnsSRVRecord, "_redis._tcp.cas.example")
        XCTAssertEqual(c.dnsServers, [RedisHostPort(host: "127.0.0.1", port: 5353), RedisHostPort(host: "::1", port: 53)])
        XCTAssertNil(c.sentinelMasterName)
        XCTAssertEqual(c.retries, 0)
        XCTAssertEqual(c.endpoint, "srv:_redis._tcp.cas.example")

        // One server given as a plain string; the record's targets are the sentinels.
        let (_, s) = try parse(indexYAML("""
            dns-srv-record: _sentinel._tcp.cas.example
            dns-servers: 127.0.0.1:5300
            sentinel-master-name: m
            """))
        XCTAssertEqual(s.dnsServers, [RedisHostPort(host: "127.0.0.1", port: 5300)])
        XCTAssertEqual(s.sentinels, [], "the sentinels come from the record")
        XCTAssertEqual(s.endpoint, "sentinel:m@srv:_sentinel._tcp.cas.example")
    }

    func testDefaultsAreBuildGridsAndCasfss() throws {
        let (spec, c) = try parse(indexYAML("host: 127.0.0.1\nport: 6379"))
        XCTAssertEqual(spec.retries, 3)
        XCTAssertNil(spec.durableReplicas)
        XCTAssertEqual(c.retries, 3, "BuildGrid's default")
        XCTAssertEqual(c.retryBackoffBase, 0.008)
        XCTAssertEqual(c.retryBackoffCap, 0.512)
        XCTAssertNil(c.sentinelMasterName)
        XCTAssertEqual(c.sentinels, [])
        XCTAssertNil(c.dnsSRVRecord)
        XCTAssertEqual(c.dnsServers, [])
        XCTAssertNil(c.durableReplicas, "1 with sentinels, else 0: decided by the pool")
        XCTAssertEqual(c.durableTimeout, 2)
        XCTAssertEqual(c.durableShortfall, .acceptIfReplicasDown)
        XCTAssertFalse(c.readFromReplicas)
        XCTAssertEqual(c.endpoint, "127.0.0.1:6379")
    }

    func testScalarTagsAndAnchorsApplyToTheNewKeys() throws {
        let yaml = """
            connections:
              - !redis-connection &redis
                sentinel-master-name: !expand-vars $MASTER
                sentinels: [!expand-vars "127.0.0.1:$SPORT"]
                durable-shortfall: accept
            storage: !with-cache-storage
              cache: !redis-index
                redis: *redis
                storage: !lru-storage
                  size: 1M
              fallback: !redis-index
                redis: *redis
                prefix: other
                storage: !lru-storage
                  size: 1M

            """
        let spec = try ConfigParser.parse(yaml: yaml, source: "t.yaml", environment: ["MASTER": "mm", "SPORT": "26500"])
        let stack = try StackBuilder().build(spec, withAccessTimes: false)
        let a = try XCTUnwrap(stack.nodes["storage.cache"] as? RedisIndex)
        let b = try XCTUnwrap(stack.nodes["storage.fallback"] as? RedisIndex)
        XCTAssertTrue(a.redis === b.redis, "one anchored connection, one pool")
        XCTAssertEqual(a.redis.config.sentinelMasterName, "mm")
        XCTAssertEqual(a.redis.config.sentinels, [RedisHostPort(host: "127.0.0.1", port: 26500)])
        XCTAssertEqual(a.redis.config.durableShortfall, .accept)
    }

    func testMistakesNameFileLineAndKey() {
        let k = "storage.redis"
        let cases: [(String, String, String?, String)] = [
            ("host: 127.0.0.1\nport: 6379\ndns-srv-record: _r._tcp.x", "\(k).dns-srv-record", "dns-srv-record:", "not both"),
            ("sentinel-master-name: m\nsentinels: [\"127.0.0.1:26379\", \"127.0.0.1:0\"]", "\(k).sentinels[1]", "sentinels:", "'127.0.0.1:0' is not host:port"),
            ("sentinel-master-name: m\nsentinels:\n  - 127.0.0.1:26379\n  - \"h:p\"", "\(k).sentinels[1]", "- \"h:p\"", "not host:port"),
            ("sentinel-master-name: m\nsentinels: \"h:\"", "\(k).sentinels", "sentinels:", "not host:port"),
            ("dns-srv-record: _r._tcp.x\ndns-servers: 127.0.0.1:99999", "\(k).dns-servers", "dns-servers:", "not host:port"),
            ("host: h\nretries: -1", "\(k).retries", "retries:", "between 0 and 100"),
            ("host: h\nretries: three", "\(k).retries", "retries:", "whole number"),
            ("host: h\ndurable-replicas: 101", "\(k).durable-replicas", "durable-replicas:", "between 0 and 100"),
            ("host: h\ndurable-timeout: 0", "\(k).durable-timeout", "durable-timeout:", "more than 0"),
            ("host: h\ndurable-timeout: 2h", "\(k).durable-timeout", "durable-timeout:", "at most 1h"),
            ("host: h\ndurable-timeout: soon", "\(k).durable-timeout", "durable-timeout:", "not a duration"),
            ("host: h\ndurable-shortfall: maybe", "\(k).durable-shortfall", "durable-shortfall:", "accept-if-replicas-down"),
            ("host: h\nsentinel-master-name: m\nread-from-replicas: perhaps", "\(k).read-from-replicas", "read-from-replicas:", "true or false"),
            ("host: h\nread-from-replicas: true", "\(k).read-from-replicas", "read-from-replicas:", "sentinel-master-name"),
            ("sentinels: [\"127.0.0.1:26379\"]", "\(k).sentinels", "sentinels:", "sentinel-master-name"),
            ("host: h\nsentinel-master-name: m\nsentinels: [\"127.0.0.1:26379\"]", "\(k).sentinels", "sentinels:", "not both"),
            ("dns-srv-record: _r._tcp.x\nsentinel-master-name: m\nsentinels: [\"127.0.0.1:26379\"]", "\(k).sentinels", "sentinels:", "record's targets"),
            ("host: h\ndns-servers: [\"127.0.0.1\"]", "\(k).dns-servers", "dns-servers:", "dns-srv-record"),
            ("unix-socket: /run/r.sock\nsentinel-master-name: m", "\(k).sentinel-master-name", "sentinel-master-name:", "unix-socket"),
            ("unix-socket: /run/r.sock\ndns-srv-record: _r._tcp.x", "\(k).dns-srv-record", "dns-srv-record:", "unix-socket"),
            ("host: h\nsentinel-master-name: \"\"", "\(k).sentinel-master-name", "sentinel-master-name:", "must not be empty"),
            ("dns-srv-record: ''", "\(k).dns-srv-record", "dns-srv-record:", "must not be empty"),
            ("port: 6379", k, "redis: !redis-connection", "needs `host:`"),
            ("host: h\nsentinel-name: m", "\(k).sentinel-name", "sentinel-name:", "unknown key"),
            ("host: h\nprotocol: 3", "\(k).protocol", "protocol:", "RESP protocol 2"),
        ]
        for (keys, key, marker, mention) in cases {
            assertConfigError(indexYAML(keys), key: key, lineMarker: marker, mention: mention)
        }
    }
}

/// `!remote-storage`'s credentials, channel options, retries, back-off and
/// deadline: parsed into the spec, built into `RemoteStorage`, and every
/// mistake named by file, line and key. Nothing here connects.
final class RemoteCredentialsConfigTests: XCTestCase {
    var dir = ""
    var pki: TestPKI!
    var token = ""

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "casfs-remote-config-\(UUID().uuidString)"
        pki = try TestPKI(directory: dir + "/pki")
        token = dir + "/token"
        try "  a.b.c  \n".write(toFile: token, atomically: true, encoding: .utf8)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func remoteYAML(_ keys: String, url: String = "https://127.0.0.1:9") -> String {
        let indented = keys.split(separator: "\n", omittingEmptySubsequences: false).map { $0.isEmpty ? "" : "    " + $0 }
            .joined(separator: "\n")
        return """
            storage: !with-cache-storage
              cache: !lru-storage
                size: 1M
              fallback: !remote-storage
                url: \(url)
            \(indented)

            """
    }

    func build(_ yaml: String, environment: [String: String] = [:]) throws -> (RemoteSpec, RemoteStorage) {
        let spec = try ConfigParser.parse(yaml: yaml, source: "t.yaml", environment: environment)
        guard case .withCache(let w) = spec.storage.kind, case .remote(let r) = w.fallback.kind else {
            throw TestSupportError("fallback is not a !remote-storage")
        }
        let stack = try StackBuilder().build(spec, withAccessTimes: false)
        return (r, try XCTUnwrap(stack.nodes["storage.fallback"] as? RemoteStorage))
    }

    func testEveryKeyReachesTheRemoteStorage() throws {
        let (spec, remote) = try build(remoteYAML("""
            request-timeout: 90s
            retries: 7
            max-backoff: 5
            credentials:
              tls-server-cert: \(pki.caCert)
              tls-client-key: \(pki.clientKey)
              tls-client-cert: \(pki.clientCert)
              auth-token: \(token)
              token-refresh-seconds: 30
            channel-options:
              keepalive-time-ms: 10000
              keepalive-timeout-ms: 4000
              keepalive-permit-without-calls: true
              max-send-message-length: 65536
              max-receive-message-length: -1
              ssl-target-name-override: localhost
              lb-policy-name: round_robin
            """))
        XCTAssertEqual(spec.requestTimeout, 90)
        XCTAssertEqual(spec.retries, 7)
        XCTAssertEqual(spec.maxBackoff, 5)
        XCTAssertEqual(spec.tlsServerCert, pki.caCert)
        XCTAssertEqual(spec.authToken, token)
        XCTAssertEqual(spec.tokenRefreshSeconds, 30)
        XCTAssertEqual(spec.channelOptions["keepalive-permit-without-calls"], "1", "a YAML boolean is 1, as Python passes it")
        XCTAssertEqual(spec.channelOptions["max-receive-message-length"], "-1")

        XCTAssertEqual(remote.endpoint, .init(host: "127.0.0.1", port: 9, secure: true))
        XCTAssertEqual(remote.requestTimeout, 90)
        XCTAssertEqual(remote.retries, 7)
        XCTAssertEqual(remote.maxBackoff, 5)
        XCTAssertEqual(remote.credentials, RemoteCredentials(tlsServerCert: pki.caCert, tlsClientKey: pki.clientKey,
                                                             tlsClientCert: pki.clientCert, authToken: token,
                                                             tokenRefreshSeconds: 30))
        let o = remote.channelOptions
        XCTAssertEqual(o.keepaliveTime, .milliseconds(10000))
        XCTAssertEqual(o.keepaliveTimeout, .milliseconds(4000))
        XCTAssertTrue(o.keepalivePermitWithoutCalls)
        XCTAssertEqual(o.maxSendMessageBytes, 65536)
        XCTAssertEqual(o.maxReceiveMessageBytes, Int(UInt32.max), "-1: no limit")
        XCTAssertEqual(o.authority, "localhost")
        XCTAssertEqual(o.ignored, ["lb-policy-name"])
        XCTAssertEqual(remote.chunkSize, 65536 - 4096, "uploads fit the send limit")
    }

    func testDefaults() throws {
        let (spec, remote) = try build(remoteYAML("", url: "grpc://127.0.0.1:9"))
        XCTAssertEqual(spec.requestTimeout, 60)
        XCTAssertEqual(remote.requestTimeout, 60, "casfs's deadline where BuildGrid has none")
        XCTAssertEqual(remote.retries, 3)
        XCTAssertEqual(remote.maxBackoff, 64)
        XCTAssertEqual(remote.credentials, .none)
        XCTAssertEqual(remote.channelOptions, ChannelOptions())
        XCTAssertEqual(remote.chunkSize, 1 << 20)
    }

    func testPathsAreExpandedAndMadeAbsolute() throws {
        let cwd = FileManager.default.currentDirectoryPath
        defer { FileManager.default.changeCurrentDirectoryPath(cwd) }
        FileManager.default.changeCurrentDirectoryPath(dir)
        let (spec, remote) = try build(remoteYAML("""
            credentials:
              tls-server-cert: !expand-path $PKI/ca.crt
              auth-token: token
              token-refresh-seconds: 0
            """), environment: ["PKI": pki.directory])
        XCTAssertEqual(spec.tlsServerCert, pki.caCert)
        XCTAssertEqual(spec.authToken.map { URL(fileURLWithPath: $0).resolvingSymlinksInPath().path },
                       URL(fileURLWithPath: token).resolvingSymlinksInPath().path, "relative to the working directory")
        XCTAssertEqual(remote.credentials.tokenRefreshSeconds, 0, "0 means BuildGrid's hour")
    }

    func testMistakesNameFileLineAndKey() throws {
        let k = "storage.fallback"
        let missing = dir + "/no-such/token"
        let notPEM = dir + "/not.pem"
        try "hello\n".write(toFile: notPEM, atomically: true, encoding: .utf8)
        let cases: [(String, String, String?, String)] = [
            ("credentials:\n  tls-server-cert: \(pki.caCert)\n  auth-token: \(missing)", "\(k).credentials.auth-token",
             "auth-token:", "cannot open '\(missing)': No such file or directory"),
            ("credentials:\n  auth-token: \(token)\n  tls-server-cert: \(missing)", "\(k).credentials.tls-server-cert",
             "tls-server-cert:", "'\(missing)'"),
            ("credentials:\n  tls-client-key: \(pki.clientKey)\n  tls-client-cert: \(missing)", "\(k).credentials.tls-client-cert",
             "tls-client-cert:", "'\(missing)'"),
            ("credentials:\n  tls-client-key: \(missing)\n  tls-client-cert: \(pki.clientCert)", "\(k).credentials.tls-client-key",
             "tls-client-key:", "'\(missing)'"),
            ("credentials:\n  tls-server-cert: \(notPEM)", "\(k).credentials.tls-server-cert", "tls-server-cert:", "not a PEM file"),
            ("credentials:\n  auth-token: \(dir)", "\(k).credentials.auth-token", "auth-token:", "is a directory"),
            ("credentials:\n  tls-client-key: \(pki.clientKey)", "\(k).credentials.tls-client-cert", "tls-client-key:", "missing"),
            ("credentials:\n  auth-token: \(token)\n  token-refresh-seconds: -1", "\(k).credentials.token-refresh-seconds",
             "token-refresh-seconds:", "not a duration"),
            ("credentials:\n  tls-server-key: \(pki.serverKey)", "\(k).credentials.tls-server-key", "tls-server-key:", "unknown key"),
            ("credentials: \(token)", "\(k).credentials", "credentials:", "mapping"),
            ("channel-options:\n  keepalive-time-ms: 100\n  keepalive-time: 10", "\(k).channel-options.keepalive-time",
             "keepalive-time:", "unknown gRPC channel argument"),
            ("channel-options:\n  max-send-message-length: 100", "\(k).channel-options.max-send-message-length",
             "max-send-message-length:", "65536"),
            ("channel-options:\n  keepalive-time-ms: soon", "\(k).channel-options.keepalive-time-ms", "keepalive-time-ms:", "integer"),
            ("channel-options:\n  keepalive-time-ms:", "\(k).channel-options.keepalive-time-ms", "keepalive-time-ms:", "needs a value"),
            ("channel-options: [keepalive-time-ms]", "\(k).channel-options", "channel-options:", "mapping"),
            ("max-backoff: 2d", "\(k).max-backoff", "max-backoff:", "0 to 86400"),
            ("max-backoff: soon", "\(k).max-backoff", "max-backoff:", "not a duration"),
            ("retries: 101", "\(k).retries", "retries:", "between 0 and 100"),
            ("retries: -1", "\(k).retries", "retries:", "between 0 and 100"),
            ("request-timeout: 0", "\(k).request-timeout", "request-timeout:", "positive"),
            ("request-timeout: 200d", "\(k).request-timeout", "request-timeout:", "at most"),
        ]
        for (keys, key, marker, mention) in cases {
            assertConfigError(remoteYAML(keys), key: key, lineMarker: marker, mention: mention)
        }
    }

    /// A plaintext URL ignores the TLS files (as BuildGrid), but the token
    /// file is still read, so a missing one is still an error.
    func testPlaintextURLIgnoresTLSFilesNotTheToken() throws {
        let (_, remote) = try build(remoteYAML("credentials:\n  tls-server-cert: \(dir)/absent.pem\n  auth-token: \(token)",
                                               url: "http://127.0.0.1:9"))
        XCTAssertFalse(remote.endpoint.secure)
        assertConfigError(remoteYAML("credentials:\n  auth-token: \(dir)/absent", url: "http://127.0.0.1:9"),
                          key: "storage.fallback.credentials.auth-token", lineMarker: "auth-token:", mention: "\(dir)/absent")
    }
}
