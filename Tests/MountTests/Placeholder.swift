import XCTest
final class MountTestsPlaceholder: XCTestCase { func testPlaceholder() {} }
