import CASCore
import XCTest

@testable import casfs

/// `-o metrics=HOST:PORT` of `casfs mount`.
final class MetricsOptionTests: XCTestCase {
    func testMetricsOptionSetsTheAddress() throws {
        let o = try MountOverrides.parse(["ro,metrics=127.0.0.1:9100"])
        XCTAssertEqual(o.metricsAddress, ListenAddress(host: "127.0.0.1", port: 9100))
        var m = MountOptions()
        m.metricsAddress = ListenAddress(host: "0.0.0.0", port: 1)
        o.apply(to: &m)
        XCTAssertEqual(m.metricsAddress, ListenAddress(host: "127.0.0.1", port: 9100), "-o overrides the config")
        XCTAssertEqual(try MountOverrides.parse(["metrics=[::1]:9200"]).metricsAddress, ListenAddress(host: "::1", port: 9200))
        XCTAssertEqual(try MountOverrides.parse(["metrics=localhost:9300"]).metricsAddress, ListenAddress(host: "localhost", port: 9300))
    }

    func testWithoutTheOptionTheConfigStands() throws {
        var m = MountOptions()
        m.metricsAddress = ListenAddress(host: "127.0.0.1", port: 9100)
        try MountOverrides.parse(["ro"]).apply(to: &m)
        XCTAssertEqual(m.metricsAddress, ListenAddress(host: "127.0.0.1", port: 9100))
        XCTAssertNil(MountOptions().metricsAddress, "off unless set")
    }

    func testAnOptionWithoutANameIsAnError() {
        for bad in ["=", "ro,=", "=1", "rw,=ro"] {
            XCTAssertThrowsError(try MountOverrides.parse([bad]), bad)
        }
        XCTAssertNoThrow(try MountOverrides.parse(["ro,,rw"]), "empty items are skipped")
    }

    func testBadMetricsOptions() {
        for bad in ["metrics", "metrics=", "metrics=9100", "metrics=:9100", "metrics=127.0.0.1", "metrics=127.0.0.1:0",
                    "metrics=127.0.0.1:65536", "metrics=::1:9100", "metrics=[::1:9100", "metrics=host name:1"] {
            XCTAssertThrowsError(try MountOverrides.parse([bad]), bad) { e in
                XCTAssertTrue("\(e)".hasPrefix("-o metrics"), "\(bad): \(e)")
            }
        }
    }
}
