import CASCore
import XCTest

final class ListenAddressTests: XCTestCase {
    func testForms() throws {
        let cases: [(String, String, Int)] = [
            ("127.0.0.1:9100", "127.0.0.1", 9100),
            ("0.0.0.0:1", "0.0.0.0", 1),
            ("[::1]:9100", "::1", 9100),
            ("[::]:65535", "::", 65535),
            ("[::ffff:127.0.0.1]:80", "::ffff:127.0.0.1", 80),
            ("[fe80::1%lo]:9100", "fe80::1%lo", 9100),
            ("localhost:9100", "localhost", 9100),
            ("metrics-1.example.org:9100", "metrics-1.example.org", 9100),
        ]
        for (text, host, port) in cases {
            let a = try ListenAddress(parsing: text)
            XCTAssertEqual(a.host, host, text)
            XCTAssertEqual(a.port, port, text)
            XCTAssertEqual(a.description, text, "written back as given")
        }
    }

    func testMistakes() {
        let cases: [(String, String)] = [
            ("", "the port is missing"),
            ("localhost", "the port is missing"),
            (":9100", "the host is missing"),
            ("::1:9100", "in brackets"),
            ("[::1:9100", "unbalanced brackets"),
            ("::1]:9100", "unbalanced brackets"),
            ("[]:9100", "unbalanced brackets"),
            ("[localhost]:9100", "IPv6"),
            ("[127.0.0.1]:9100", "IPv6"),
            ("host name:9100", "neither an IP address nor a host name"),
            ("-x:9100", "neither an IP address nor a host name"),
            ("http://h:9100", "in brackets"),
            ("h:", "from 1 to 65535"),
            ("h:0", "from 1 to 65535"),
            ("h:65536", "from 1 to 65535"),
            ("h:123456", "from 1 to 65535"),
            ("h:99999999999999999999999999", "from 1 to 65535"),
            ("h:-1", "from 1 to 65535"),
            ("h:+80", "from 1 to 65535"),
            ("h:８０", "from 1 to 65535"),
        ]
        for (text, why) in cases {
            XCTAssertThrowsError(try ListenAddress(parsing: text), text) { e in
                XCTAssertTrue("\(e)".contains(why), "\(text): \(e)")
                XCTAssertTrue("\(e)".hasPrefix("'\(text)' is not HOST:PORT: "), "\(text): \(e)")
            }
        }
    }
}
