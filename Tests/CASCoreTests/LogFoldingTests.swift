import CASCore
import Foundation
import Logging
import Synchronization
import XCTest

/// Collects what is logged.
final class CapturedLines: Sendable {
    let lines = Mutex<[String]>([])
    var all: [String] { lines.withLock { $0 } }
}

struct CapturingHandler: LogHandler {
    let sink: CapturedLines
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
             file: String, function: String, line: UInt) {
        sink.lines.withLock { $0.append("\(level) \(message)") }
    }
}

final class LogFoldingTests: XCTestCase {
    func make(window: Duration, perKind: Int = 20) -> (LogFolder, CapturedLines) {
        let sink = CapturedLines()
        let logger = Logger(label: "test") { _ in CapturingHandler(sink: sink) }
        return (LogFolder(logger: logger, window: window, perKindLimit: perKind), sink)
    }

    func testRepeatsOfOneKindAndKeyAreFoldedIntoOneLine() {
        let (folder, sink) = make(window: .milliseconds(300))
        for _ in 0..<2000 { folder.warning(kind: "lookup", key: "tree abc", "lookup: tree abc: not a Directory") }
        XCTAssertEqual(sink.all, ["warning lookup: tree abc: not a Directory"])
        // Another key of the kind is its own line.
        folder.warning(kind: "lookup", key: "tree def", "lookup: tree def: not a Directory")
        XCTAssertEqual(sink.all.count, 2)
        usleep(400_000)
        folder.flush()
        XCTAssertTrue(sink.all.contains("warning lookup tree abc: … and 1,999 more in the last 0.3 seconds")
                      || sink.all.contains { $0.hasPrefix("warning lookup tree abc: … and 1,999 more in the last") }, "\(sink.all)")
        XCTAssertEqual(sink.all.count, 3, "no summary for a key said once: \(sink.all)")
        // A new window logs the first line again.
        folder.warning(kind: "lookup", key: "tree abc", "lookup: tree abc: again")
        XCTAssertEqual(sink.all.last, "warning lookup: tree abc: again")
    }

    func testVaryingTheKeyDoesNotFloodEither() {
        let (folder, sink) = make(window: .seconds(3600), perKind: 5)
        for i in 0..<10_000 { folder.error(kind: "verify", key: "digest \(i)", "verify: digest \(i) does not match") }
        XCTAssertEqual(sink.all.count, 5)
        // Other kinds have their own budget.
        folder.error(kind: "remote", key: "x", "remote: x failed")
        XCTAssertEqual(sink.all.count, 6)
    }

    func testTheSummaryComesWithoutAnotherLine() {
        let (folder, sink) = make(window: .milliseconds(200), perKind: 2)
        for i in 0..<100 { folder.warning(kind: "bad name", key: "n\(i % 3)", "bad name n\(i % 3)") }
        // The timer writes the summaries once the window ends.
        let deadline = Date().addingTimeInterval(30)
        while !sink.all.contains(where: { $0.contains("more lines") }), Date() < deadline { usleep(50_000) }
        XCTAssertTrue(sink.all.contains { $0.contains("bad name: … and 33 more lines") }, "\(sink.all)")
        XCTAssertTrue(sink.all.contains { $0.contains("bad name n0: … and 33 more in the last") }, "\(sink.all)")
    }

    /// Kinds that vary (a caller that puts a name into its kind) cannot get
    /// round the folding: beyond `maxKinds` in a window they share one count.
    func testVaryingKindsAreBounded() {
        let (folder, sink) = make(window: .seconds(60), perKind: 5)
        for i in 0..<5000 { folder.warning(kind: "lookup \(i) in", key: "tree \(i)", "lookup \(i): bad") }
        XCTAssertEqual(sink.all.count, LogFolder.maxKinds, "lines logged in one window")
    }
}
