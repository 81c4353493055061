import XCTest
final class CASCoreTestsPlaceholder: XCTestCase { func testPlaceholder() {} }
