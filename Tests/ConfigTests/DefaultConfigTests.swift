import CASConfig
import CASCore
import CASStorage
import Foundation
import XCTest

final class DefaultConfigTests: XCTestCase {
    func testDataDirectoryFollowsXDG() {
        XCTAssertEqual(DefaultConfig.dataDirectory(environment: ["XDG_DATA_HOME": "/x/data", "HOME": "/h"]), "/x/data/casfs")
        XCTAssertEqual(DefaultConfig.dataDirectory(environment: ["HOME": "/h"]), "/h/.local/share/casfs")
        XCTAssertEqual(DefaultConfig.dataDirectory(environment: ["XDG_DATA_HOME": "relative", "HOME": "/h"]), "/h/.local/share/casfs")
    }
}
