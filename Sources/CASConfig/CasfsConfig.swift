import CASCore
import CASStorage
import Foundation
import Redis
import RemoteCAS
import Yams

/// A parsed configuration: the storage the mount serves, the index found in it
/// (for listing, totals and access times) and the mount options.
///
/// The file's top level holds `storage:` (one storage node), `mount:` (casfs's
/// options) and optionally `connections:` / `storages:` lists that only hold
/// YAML anchors, as BuildGrid configuration files do. Storage nodes use
/// BuildGrid's tags, so a BuildGrid storage section can be pasted in.
public struct CasfsConfig: Sendable {
    public var storage: any Storage
    public var index: (any BlobIndex)?
    public var mount: MountOptions

    public init(storage: any Storage, index: (any BlobIndex)?, mount: MountOptions) {
        self.storage = storage
        self.index = index
        self.mount = mount
    }

    /// Reads and builds the configuration in `path`.
    public static func load(path: String) throws -> CasfsConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(source: path, line: nil, key: "", message: "cannot read the configuration file")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(source: path, line: nil, key: "", message: "not UTF-8 text")
        }
        return try parse(yaml: text, source: path)
    }

    /// Builds a configuration from YAML text; `source` names it in errors.
    public static func parse(yaml: String, source: String = "<config>") throws -> CasfsConfig {
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch let e as YamlError {
            throw ConfigError(source: source, line: yamlErrorLine(e), key: "", message: "invalid YAML: \(e)")
        }
        guard let root else {
            throw ConfigError(source: source, line: nil, key: "", message: "the file is empty; it needs a `storage:` section")
        }
        return try ConfigBuilder(source: source).build(root)
    }
}

private func yamlErrorLine(_ e: YamlError) -> Int? {
    switch e {
    case .scanner(_, _, let mark, _), .parser(_, _, let mark, _), .composer(_, _, let mark, _):
        return mark.line
    default:
        return nil
    }
}

/// Walks the YAML tree and builds storages. Nodes reached through aliases build
/// once, so an anchored storage or Redis connection is shared.
final class ConfigBuilder {
    let source: String
    private var storages: [Node: any Storage] = [:]
    private var pools: [(RedisConfig, RedisPool)] = []
    private var indexes: [any BlobIndex] = []

    init(source: String) { self.source = source }

    func build(_ root: Node) throws -> CasfsConfig {
        let top = try mapping(root, "", allowed: ["storage", "mount", "connections", "storages"])
        guard let storageNode = top["storage"] else {
            throw error(root, "", "missing `storage:` (the storage node the mount serves)")
        }
        let storage = try buildStorage(storageNode, "storage")
        let mount = try top["mount"].map { try buildMount($0, "mount") } ?? MountOptions()
        return CasfsConfig(storage: storage, index: indexes.first, mount: mount)
    }

    // MARK: Storage nodes

    func buildStorage(_ node: Node, _ key: String) throws -> any Storage {
        if let built = storages[node] { return built }
        let tag = node.tag.rawValue
        let storage: any Storage
        switch tag {
        case "!disk-storage":
            let m = try mapping(node, key, allowed: ["path"])
            let path = try string(m, "path", key, required: true)!
            do { storage = try DiskStorage(root: expandHome(path)) } catch {
                throw self.error(m["path"] ?? node, "\(key).path", "\(error)")
            }
        case "!lru-storage":
            let m = try mapping(node, key, allowed: ["size"])
            storage = MemoryStorage(maxBytes: try size(m, "size", key, required: true)!)
        case "!with-cache-storage":
            let m = try mapping(node, key, allowed: ["cache", "fallback", "defer-fallback-writes", "fallback-writer-threads"])
            guard let cacheNode = m["cache"] else { throw error(node, key, "missing `cache:`") }
            guard let fallbackNode = m["fallback"] else { throw error(node, key, "missing `fallback:`") }
            let threads = try int(m, "fallback-writer-threads", key) ?? 20
            guard threads > 0 else { throw error(m["fallback-writer-threads"]!, "\(key).fallback-writer-threads", "must be at least 1") }
            storage = WithCacheStorage(
                cache: try buildStorage(cacheNode, "\(key).cache"),
                fallback: try buildStorage(fallbackNode, "\(key).fallback"),
                deferFallbackWrites: try bool(m, "defer-fallback-writes", key) ?? false,
                fallbackWriterThreads: threads)
        case "!redis-index":
            let m = try mapping(node, key, allowed: ["storage", "redis", "prefix"])
            guard let inner = m["storage"] else { throw error(node, key, "missing `storage:`") }
            guard let redisNode = m["redis"] else { throw error(node, key, "missing `redis:` (a !redis-connection)") }
            let pool = try buildRedis(redisNode, "\(key).redis")
            let prefix = try string(m, "prefix", key)
            do {
                let index = try RedisIndex(redis: pool, storage: try buildStorage(inner, "\(key).storage"), prefix: prefix)
                indexes.append(index)
                storage = index
            } catch let e as ConfigError {
                throw e
            } catch {
                throw self.error(m["prefix"] ?? node, "\(key).prefix", "\(error)")
            }
        case "!redis-connection":
            throw error(node, key, "a !redis-connection is not a storage; use it as the `redis:` of a !redis-index")
        case "!remote-storage":
            let m = try mapping(node, key, allowed: ["url", "instance-name", "request-timeout", "retries"])
            let url = try string(m, "url", key, required: true)!
            let timeout = try duration(m, "request-timeout", key) ?? 60
            guard timeout > 0 else { throw error(m["request-timeout"]!, "\(key).request-timeout", "must be positive") }
            let retries = try int(m, "retries", key) ?? 3
            guard retries >= 0 else { throw error(m["retries"]!, "\(key).retries", "must not be negative") }
            do {
                storage = try RemoteStorage(
                    url: url, instanceName: try string(m, "instance-name", key) ?? "",
                    requestTimeout: timeout, retries: retries)
            } catch {
                throw self.error(m["url"] ?? node, "\(key).url", "\(error)")
            }
        default:
            let what = tag.hasPrefix("!") ? "unknown storage tag \(tag)" : "expected a storage node (a tag such as !disk-storage)"
            throw error(node, key, "\(what); known: !disk-storage, !lru-storage, !with-cache-storage, !redis-index, !remote-storage")
        }
        storages[node] = storage
        return storage
    }

    func buildRedis(_ node: Node, _ key: String) throws -> RedisPool {
        guard node.tag.rawValue == "!redis-connection" else {
            throw error(node, key, "expected a !redis-connection")
        }
        let m = try mapping(node, key, allowed: [
            "host", "port", "password", "db", "unix-socket", "retries", "protocol",
            "connect-timeout", "command-timeout", "max-connections",
        ])
        var c = RedisConfig()
        if let host = try string(m, "host", key) { c.host = host }
        if let port = try int(m, "port", key) {
            guard (1...65535).contains(port) else { throw error(m["port"]!, "\(key).port", "not a port number") }
            c.port = port
        }
        c.unixSocket = try string(m, "unix-socket", key).map(expandHome)
        c.password = try string(m, "password", key)
        if let db = try int(m, "db", key) {
            guard db >= 0 else { throw error(m["db"]!, "\(key).db", "must not be negative") }
            c.db = db
        }
        if let t = try duration(m, "connect-timeout", key) { c.connectTimeout = t }
        if let t = try duration(m, "command-timeout", key) { c.commandTimeout = t }
        if let n = try int(m, "max-connections", key) {
            guard n > 0 else { throw error(m["max-connections"]!, "\(key).max-connections", "must be at least 1") }
            c.maxConnections = n
        }
        if let p = try int(m, "protocol", key), p != 2 {
            throw error(m["protocol"]!, "\(key).protocol", "only RESP protocol 2 is supported")
        }
        _ = try int(m, "retries", key)
        if c.unixSocket == nil && m["host"] == nil {
            throw error(node, key, "needs `host:` (and `port:`) or `unix-socket:`")
        }
        if let (_, pool) = pools.first(where: { $0.0 == c }) { return pool }
        let pool = RedisPool(c)
        pools.append((c, pool))
        return pool
    }

    // MARK: Mount options

    func buildMount(_ node: Node, _ key: String) throws -> MountOptions {
        let m = try mapping(node, key, allowed: [
            "writable", "entry-timeout", "attr-timeout", "negative-timeout", "threads",
            "allow-other", "max-read", "fs-name", "tree-cache-size", "tree-prefetch",
        ])
        var o = MountOptions()
        if let v = try bool(m, "writable", key) { o.writable = v }
        if let v = try duration(m, "entry-timeout", key) { o.entryTimeout = v }
        if let v = try duration(m, "attr-timeout", key) { o.attrTimeout = v }
        if let v = try duration(m, "negative-timeout", key) { o.negativeTimeout = v }
        if let v = try int(m, "threads", key) {
            guard v >= 0 else { throw error(m["threads"]!, "\(key).threads", "must not be negative") }
            o.threads = v
        }
        if let v = try bool(m, "allow-other", key) { o.allowOther = v }
        if let v = try size(m, "max-read", key) {
            guard v >= 4096, v <= 1 << 20 else { throw error(m["max-read"]!, "\(key).max-read", "must be between 4K and 1M") }
            o.maxRead = Int(v)
        }
        if let v = try string(m, "fs-name", key) { o.fsName = v }
        if let v = try size(m, "tree-cache-size", key) {
            guard v >= 64 << 10 else { throw error(m["tree-cache-size"]!, "\(key).tree-cache-size", "must be at least 64K") }
            o.treeCacheBytes = v
        }
        if let v = try bool(m, "tree-prefetch", key) { o.treePrefetch = v }
        return o
    }

    // MARK: Typed accessors, each naming the key and line on error

    func mapping(_ node: Node, _ key: String, allowed: Set<String>) throws -> [String: Node] {
        if case .scalar(let s) = node, s.string.isEmpty || s.string == "~" || s.string == "null" {
            return [:]
        }
        guard let m = node.mapping else { throw error(node, key, "expected a mapping of keys") }
        var out: [String: Node] = [:]
        for (k, v) in m {
            guard let name = k.string else { throw error(k, key, "keys must be strings") }
            let path = key.isEmpty ? name : "\(key).\(name)"
            guard allowed.contains(name) else {
                throw error(k, path, "unknown key; expected one of: \(allowed.sorted().joined(separator: ", "))")
            }
            guard out[name] == nil else { throw error(k, path, "given twice") }
            out[name] = v
        }
        return out
    }

    func string(_ m: [String: Node], _ name: String, _ key: String, required: Bool = false) throws -> String? {
        guard let node = m[name] else {
            if required { throw ConfigError(source: source, line: nil, key: "\(key).\(name)", message: "missing") }
            return nil
        }
        guard let s = node.scalar?.string, node.tag.rawValue != "tag:yaml.org,2002:null" else {
            throw error(node, "\(key).\(name)", "expected a string")
        }
        return s
    }

    func int(_ m: [String: Node], _ name: String, _ key: String) throws -> Int? {
        guard let node = m[name] else { return nil }
        guard let v = node.int else { throw error(node, "\(key).\(name)", "expected a whole number") }
        return v
    }

    func bool(_ m: [String: Node], _ name: String, _ key: String) throws -> Bool? {
        guard let node = m[name] else { return nil }
        guard let v = node.bool else { throw error(node, "\(key).\(name)", "expected true or false") }
        return v
    }

    func size(_ m: [String: Node], _ name: String, _ key: String, required: Bool = false) throws -> Int64? {
        guard let node = m[name] else {
            if required { throw ConfigError(source: source, line: nil, key: "\(key).\(name)", message: "missing") }
            return nil
        }
        guard let text = node.scalar?.string, let v = parseByteSize(text) else {
            throw error(node, "\(key).\(name)", "'\(node.scalar?.string ?? "?")' is not a size (bytes, or a number with K, M, G or T)")
        }
        return v
    }

    func duration(_ m: [String: Node], _ name: String, _ key: String) throws -> Double? {
        guard let node = m[name] else { return nil }
        guard let text = node.scalar?.string, let v = parseDuration(text) else {
            throw error(node, "\(key).\(name)", "'\(node.scalar?.string ?? "?")' is not a duration (seconds, or 90s, 15m, 2h, 7d)")
        }
        return v
    }

    func error(_ node: Node, _ key: String, _ message: String) -> ConfigError {
        ConfigError(source: source, line: node.mark?.line, key: key, message: message)
    }
}

/// `~/x` → `$HOME/x`; a relative path → absolute from the current directory
/// (so a daemon may change directory later).
private func expandHome(_ path: String) -> String {
    var p = path
    if p.hasPrefix("~/"), let home = ProcessInfo.processInfo.environment["HOME"] { p = home + p.dropFirst() }
    if !p.hasPrefix("/") { p = FileManager.default.currentDirectoryPath + "/" + p }
    return URL(fileURLWithPath: p).standardizedFileURL.path
}
