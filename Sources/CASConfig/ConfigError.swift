import Foundation

/// A configuration mistake, located by file, line and the dotted key path.
public struct ConfigError: Error, CustomStringConvertible, Sendable {
    public let source: String
    public let line: Int?
    public let key: String
    public let message: String

    public init(source: String, line: Int?, key: String, message: String) {
        self.source = source
        self.line = line
        self.key = key
        self.message = message
    }

    public var description: String {
        let place = line.map { "\(source):\($0)" } ?? source
        return key.isEmpty ? "\(place): \(message)" : "\(place): \(key): \(message)"
    }
}
