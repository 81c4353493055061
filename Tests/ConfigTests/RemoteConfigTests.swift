import CASConfig
import CASCore
import CASStorage
import RemoteCAS
import XCTest

final class RemoteConfigTests: XCTestCase {
    func testRemoteStorageAsFallback() throws {
        let c = try CasfsConfig.parse(yaml: """
            storage: !with-cache-storage
              cache: !lru-storage
                size: 1M
              fallback: !remote-storage
                url: https://cas.example:8443
                instance-name: main
                request-timeout: 90s
                retries: 5

            """)
        let r = try XCTUnwrap(c.nodes["storage.fallback"] as? RemoteStorage)
        XCTAssertEqual(r.endpoint, .init(host: "cas.example", port: 8443, secure: true))
        XCTAssertEqual(r.instanceName, "main")
        XCTAssertEqual(r.requestTimeout, 90)
        XCTAssertEqual(r.retries, 5)
    }

    func testRemoteStorageDefaultsAndURLForms() throws {
        for (url, endpoint) in [
            ("http://127.0.0.1:50051", RemoteStorage.Endpoint(host: "127.0.0.1", port: 50051, secure: false)),
            ("grpc://localhost:1234", .init(host: "localhost", port: 1234, secure: false)),
            ("grpcs://cas.example", .init(host: "cas.example", port: 443, secure: true)),
        ] {
            let c = try CasfsConfig.parse(yaml: "storage: !remote-storage\n  url: \(url)\n")
            let r = try XCTUnwrap(c.nodes["storage"] as? RemoteStorage)
            XCTAssertEqual(r.endpoint, endpoint)
            XCTAssertEqual(r.instanceName, "")
            XCTAssertEqual(r.retries, 3)
        }
    }

    func testRemoteStorageErrorsNameKeyAndLine() {
        let cases: [(String, String, Int?)] = [
            ("storage: !remote-storage\n  instance-name: x\n", "storage.url", nil),
            ("storage: !remote-storage\n  url: ftp://h:1\n", "storage.url", 2),
            ("storage: !remote-storage\n  url: grpc://h:1\n  retries: -1\n", "storage.retries", 3),
            ("storage: !remote-storage\n  url: grpc://h:1\n  request-timeout: soon\n", "storage.request-timeout", 3),
            ("storage: !remote-storage\n  url: grpc://h:1\n  credentials: x\n", "storage.credentials", 3),
        ]
        for (yaml, expected, line) in cases {
            XCTAssertThrowsError(try CasfsConfig.parse(yaml: yaml, source: "t.yaml"), yaml) { e in
                let text = "\(e)"
                XCTAssertTrue(text.contains(expected), "\(text) lacks \(expected)")
                if let line { XCTAssertTrue(text.hasPrefix("t.yaml:\(line):"), text) }
            }
        }
    }
}
