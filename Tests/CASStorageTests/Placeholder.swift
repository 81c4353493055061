import XCTest
final class CASStorageTestsPlaceholder: XCTestCase { func testPlaceholder() {} }
