import CASCore
import Foundation

/// `-o` options of `casfs mount`: casfs's own mount options, overriding the
/// config's `mount:` section. Generic mount(8) options are accepted and ignored.
struct MountOverrides {
    var writable: Bool?
    var allowOther: Bool?
    var entryTimeout: Double?
    var attrTimeout: Double?
    var negativeTimeout: Double?
    var threads: Int?
    var maxRead: Int?
    var fsName: String?
    /// Read-only mounts: let the kernel skip OPEN/RELEASE (access time refreshed at lookup).
    var noOpen: Bool?
    /// `passthrough=auto|off`.
    var passthrough: Bool?
    /// `open` / `noopen`: whether a read-only mount asks the daemon at each open.
    var openless: Bool?
    /// `metrics=HOST:PORT`: serve the metrics there.
    var metricsAddress: ListenAddress?
    /// `tree_directory_mode=0755`.
    var treeDirectoryMode: UInt32?

    static let ignored: Set<String> = [
        "defaults", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
        "relatime", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
    ]

    struct BadOption: Error, CustomStringConvertible {
        let description: String
    }

    static func parse(_ args: [String]) throws -> MountOverrides {
        var o = MountOverrides()
        for arg in args {
            for item in arg.split(separator: ",", omittingEmptySubsequences: true) {
                let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
                let key = parts[0]
                guard !key.isEmpty else { throw BadOption(description: "-o '\(item)': an option needs a name") }
                let value = parts.count > 1 && !parts[1].isEmpty ? parts[1] : nil
                func number() throws -> Double {
                    guard let value, let v = Double(value), v >= 0, v.isFinite else {
                        throw BadOption(description: "-o \(key) needs a non-negative number of seconds")
                    }
                    return v
                }
                func integer() throws -> Int {
                    guard let value, let v = Int(value), v >= 0 else {
                        throw BadOption(description: "-o \(key) needs a non-negative integer")
                    }
                    return v
                }
                switch key {
                case "rw", "writable": o.writable = true
                case "ro": o.writable = false
                case "allow_other": o.allowOther = true
                case "noopen": o.noOpen = true; o.openless = true
                case "open": o.openless = false
                case "passthrough":
                    switch value {
                    case "auto", nil: o.passthrough = true
                    case "off": o.passthrough = false
                    default: throw BadOption(description: "-o passthrough takes auto or off")
                    }
                case "entry_timeout": o.entryTimeout = try number()
                case "attr_timeout": o.attrTimeout = try number()
                case "negative_timeout": o.negativeTimeout = try number()
                case "threads": o.threads = try integer()
                case "max_read":
                    let v = try integer()
                    guard v >= 4096, v <= 1 << 20 else { throw BadOption(description: "-o max_read must be 4096...1048576") }
                    o.maxRead = v
                case "fsname":
                    guard let value, !value.isEmpty, !value.contains(",") else { throw BadOption(description: "-o fsname needs a value") }
                    o.fsName = value
                case "tree_directory_mode":
                    guard let value, let mode = MountOptions.parseMode(value) else {
                        throw BadOption(description: "-o tree_directory_mode needs an octal mode (e.g. 0755)")
                    }
                    o.treeDirectoryMode = mode
                case "metrics":
                    guard let value else { throw BadOption(description: "-o metrics needs HOST:PORT") }
                    do { o.metricsAddress = try ListenAddress(parsing: value) } catch {
                        throw BadOption(description: "-o metrics: \(error)")
                    }
                default:
                    if ignored.contains(key) { continue }
                    throw BadOption(description: "unknown mount option '\(item)' (known: rw, ro, allow_other, entry_timeout=S, attr_timeout=S, negative_timeout=S, threads=N, max_read=N, fsname=NAME, open, noopen, passthrough=auto|off, metrics=HOST:PORT, tree_directory_mode=MODE)")
                }
            }
        }
        return o
    }

    func apply(to m: inout MountOptions) {
        if let writable { m.writable = writable }
        if let allowOther { m.allowOther = allowOther }
        if let entryTimeout { m.entryTimeout = entryTimeout }
        if let attrTimeout { m.attrTimeout = attrTimeout }
        if let negativeTimeout { m.negativeTimeout = negativeTimeout }
        if let threads { m.threads = threads }
        if let maxRead { m.maxRead = maxRead }
        if let fsName { m.fsName = fsName }
        if let passthrough { m.passthrough = passthrough }
        if let openless { m.openless = openless }
        if let metricsAddress { m.metricsAddress = metricsAddress }
        if let treeDirectoryMode { m.treeDirectoryMode = treeDirectoryMode }
    }
}
