import XCTest
final class RedisIndexTestsPlaceholder: XCTestCase { func testPlaceholder() {} }
