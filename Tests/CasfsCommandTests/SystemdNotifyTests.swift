import Foundation
import Logging
import TestSupport
import XCTest

@testable import casfs
import CASDaemon

/// The readiness datagram, received on real unix datagram sockets as
/// systemd would receive it.
final class SystemdNotifyTests: XCTestCase {
    override func tearDown() {
        unsetenv(SystemdNotify.variable)
    }

    func check(abstract: Bool) throws {
        let receiver = try NotifySocket(abstract: abstract)
        setenv(SystemdNotify.variable, receiver.name, 1)
        let notify = try XCTUnwrap(SystemdNotify.take())
        XCTAssertEqual(notify.socketName, receiver.name)
        XCTAssertNil(getenv(SystemdNotify.variable), "taken out of the environment")
        XCTAssertNil(SystemdNotify.take(), "taken once")
        notify.ready(Logger(label: "test"))
        XCTAssertEqual(receiver.receive(), "READY=1")
    }

    func testReadyOnASocketPath() throws {
        try check(abstract: false)
    }

    func testReadyOnAnAbstractSocket() throws {
        try check(abstract: true)
    }

    func testNothingWithoutTheVariable() {
        unsetenv(SystemdNotify.variable)
        XCTAssertNil(SystemdNotify.take())
        setenv(SystemdNotify.variable, "", 1)
        XCTAssertNil(SystemdNotify.take())
    }

    func testUnusableNamesAreErrors() throws {
        for bad in ["relative/path", "@", "/" + String(repeating: "x", count: 200)] {
            XCTAssertThrowsError(try SystemdNotify(socketName: bad).send("READY=1"), bad)
        }
        // Nobody listening there.
        XCTAssertThrowsError(try SystemdNotify(socketName: NSTemporaryDirectory() + "casfs-no-such-\(UUID().uuidString)").send("READY=1"))
    }
}
