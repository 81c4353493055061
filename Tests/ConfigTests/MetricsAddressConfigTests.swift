import CASConfig
import CASCore
import XCTest

/// `mount: metrics-address: HOST:PORT`.
final class MetricsAddressConfigTests: XCTestCase {
    func spec(_ address: String) throws -> ConfigSpec {
        try ConfigParser.parse(yaml: "storage: !lru-storage\n  size: 1M\nmount:\n  metrics-address: \(address)\n", source: "t.yaml")
    }

    func testAddresses() throws {
        XCTAssertEqual(try spec("127.0.0.1:9100").mount.metricsAddress, ListenAddress(host: "127.0.0.1", port: 9100))
        XCTAssertEqual(try spec("0.0.0.0:9100").mount.metricsAddress, ListenAddress(host: "0.0.0.0", port: 9100))
        XCTAssertEqual(try spec("'[::1]:9101'").mount.metricsAddress, ListenAddress(host: "::1", port: 9101))
        XCTAssertEqual(try spec("'[::]:9102'").mount.metricsAddress, ListenAddress(host: "::", port: 9102))
        XCTAssertEqual(try spec("localhost:65535").mount.metricsAddress, ListenAddress(host: "localhost", port: 65535))
        XCTAssertEqual(try spec("metrics.example.org:1").mount.metricsAddress, ListenAddress(host: "metrics.example.org", port: 1))
    }

    func testOffUnlessSet() throws {
        let c = try ConfigParser.parse(yaml: "storage: !lru-storage\n  size: 1M\nmount:\n  writable: true\n")
        XCTAssertNil(c.mount.metricsAddress)
        XCTAssertNil(try spec("~").mount.metricsAddress, "null: not served")
    }

    func testScalarTagsApply() throws {
        let c = try ConfigParser.parse(yaml: "storage: !lru-storage\n  size: 1M\nmount:\n  metrics-address: !expand-vars '${HOST}:9100'\n",
                                       environment: ["HOST": "127.0.0.1"])
        XCTAssertEqual(c.mount.metricsAddress, ListenAddress(host: "127.0.0.1", port: 9100))
    }

    func testBadAddressesNameKeyAndLine() {
        let bad = ["9100", "':9100'", "127.0.0.1", "'127.0.0.1:'", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:99999999999999999999999",
                   "127.0.0.1:91a0", "'::1:9100'", "'[::1:9100'", "'::1]:9100'", "'[]:9100'", "'[localhost]:9100'",
                   "'host name:9100'", "'-host:9100'", "'http://127.0.0.1:9100'", "'127.0.0.1:+9100'"]
        for address in bad {
            XCTAssertThrowsError(try spec(address), address) { e in
                let text = "\(e)"
                XCTAssertTrue(text.hasPrefix("t.yaml:4: mount.metrics-address: "), "\(address): \(text)")
                XCTAssertTrue(text.contains("is not HOST:PORT"), "\(address): \(text)")
            }
        }
    }

    func testListValueIsAnError() {
        XCTAssertThrowsError(try spec("[127.0.0.1, 9100]")) { e in
            XCTAssertTrue("\(e)".contains("mount.metrics-address"), "\(e)")
        }
    }
}
