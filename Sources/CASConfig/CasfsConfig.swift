import CASCore
import Foundation

/// Reading and building a configuration file in one step.
public enum CasfsConfig {
    /// Parses `path` and builds its storage stack.
    public static func load(path: String, metrics: Metrics = Metrics()) throws -> StorageStack {
        try StackBuilder(metrics: metrics).build(try ConfigParser.load(path: path))
    }

    /// Parses YAML text and builds its storage stack.
    public static func parse(yaml: String, source: String = "<config>", metrics: Metrics = Metrics()) throws -> StorageStack {
        try StackBuilder(metrics: metrics).build(try ConfigParser.parse(yaml: yaml, source: source))
    }
}
