import CASCore
import CASStorage
import Foundation
import Redis
import Yams

/// Reads a configuration file into plain values (`ConfigSpec`), checking
/// every key and value; nothing is created or started here.
///
/// The file's top level holds `storage:` (one storage node), `mount:` (casfs's
/// options) and optionally `connections:` / `storages:` lists that only hold
/// YAML anchors, as BuildGrid configuration files do. Storage nodes use
/// BuildGrid's tags, so a BuildGrid storage section can be pasted in.
/// Scalars may carry BuildGrid's `!expand-vars`, `!expand-path` and
/// `!read-file` tags; any other tag on a scalar is an error.
public enum ConfigParser {
    /// Reads `path`.
    public static func load(path: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> ConfigSpec {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(source: path, line: nil, key: "", message: "cannot read the configuration file")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(source: path, line: nil, key: "", message: "not UTF-8 text")
        }
        return try parse(yaml: text, source: path, environment: environment)
    }

    /// Parses YAML text; `source` names it in errors.
    public static func parse(yaml: String, source: String = "<config>",
                             environment: [String: String] = ProcessInfo.processInfo.environment) throws -> ConfigSpec {
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch let e as YamlError {
            throw ConfigError(source: source, line: yamlErrorLine(e), key: "", message: "invalid YAML: \(e)")
        }
        guard let root else {
            throw ConfigError(source: source, line: nil, key: "", message: "the file is empty; it needs a `storage:` section")
        }
        return try SpecReader(source: source, environment: environment).read(root)
    }

    private static func yamlErrorLine(_ e: YamlError) -> Int? {
        switch e {
        case .scanner(_, _, let mark, _), .parser(_, _, let mark, _), .composer(_, _, let mark, _):
            return mark.line
        default:
            return nil
        }
    }
}

/// The storage tags casfs builds.
let supportedStorageTags = ["!disk-storage", "!lru-storage", "!with-cache-storage", "!redis-index", "!remote-storage",
                            "!sharded-storage", "!replicated-storage", "!size-differentiated-storage"]

/// BuildGrid's other tags: named in errors so that a pasted section that uses
/// one says clearly what casfs lacks.
let unsupportedBuildGridTags: Set<String> = [
    "!s3-storage", "!redis-storage", "!sql-storage", "!sql-index", "!redis-fmb-cache",
    "!sql-connection", "!lru-action-cache", "!mirrored-action-cache", "!redis-action-cache",
    "!remote-action-cache", "!s3action-cache", "!sharded-action-cache", "!with-cache-action-cache",
    "!write-once-action-cache", "!channel", "!cas", "!bytestream", "!action-cache", "!execution",
]

/// Walks the YAML tree. Nodes reached through aliases get one id, so an
/// anchored storage or Redis connection is built once.
final class SpecReader {
    let source: String
    let environment: [String: String]
    private var storageIDs: [Node: Int] = [:]
    private var storages: [Int: StorageNode] = [:]
    private var redisSpecs: [Node: RedisSpec] = [:]
    private var nextID = 1

    init(source: String, environment: [String: String]) {
        self.source = source
        self.environment = environment
    }

    func read(_ root: Node) throws -> ConfigSpec {
        let top = try mapping(root, "", allowed: ["storage", "mount", "connections", "storages"])
        guard let storageNode = top["storage"] else {
            throw error(root, "", "missing `storage:` (the storage node the mount serves)")
        }
        let storage = try storageSpec(storageNode, "storage")
        let mount = try top["mount"].map { try mountOptions($0, "mount") } ?? MountOptions()
        return ConfigSpec(storage: storage, mount: mount, source: source)
    }

    // MARK: storage nodes

    func storageSpec(_ node: Node, _ key: String) throws -> StorageNode {
        if let id = storageIDs[node], let built = storages[id] { return built }
        let tag = node.tag.rawValue
        let kind: StorageNode.Kind
        switch tag {
        case "!disk-storage":
            let m = try mapping(node, key, allowed: ["path"])
            kind = .disk(path: absolutePath(try string(m, "path", key, required: true)!))
        case "!lru-storage":
            let m = try mapping(node, key, allowed: ["size"])
            kind = .memory(size: try size(m, "size", key, required: true)!)
        case "!with-cache-storage":
            let m = try mapping(node, key, allowed: ["cache", "fallback", "defer-fallback-writes", "fallback-writer-threads", "journal"])
            guard let cacheNode = m["cache"] else { throw error(node, key, "missing `cache:`") }
            guard let fallbackNode = m["fallback"] else { throw error(node, key, "missing `fallback:`") }
            var spec = WithCacheSpec(cache: try storageSpec(cacheNode, "\(key).cache"),
                                     fallback: try storageSpec(fallbackNode, "\(key).fallback"))
            spec.deferFallbackWrites = try bool(m, "defer-fallback-writes", key) ?? false
            if let t = try int(m, "fallback-writer-threads", key, range: 1...1024) { spec.fallbackWriterThreads = t }
            spec.journal = try string(m, "journal", key).map(absolutePath)
            if spec.deferFallbackWrites, spec.journal == nil {
                guard case .disk = spec.cache.kind else {
                    throw error(node, key, "defer-fallback-writes needs `journal:` (a directory where writes wait for the fallback) unless the cache is a !disk-storage")
                }
            }
            kind = .withCache(spec)
        case "!redis-index":
            let m = try mapping(node, key, allowed: ["storage", "redis", "prefix"])
            guard let inner = m["storage"] else { throw error(node, key, "missing `storage:`") }
            guard let redisNode = m["redis"] else { throw error(node, key, "missing `redis:` (a !redis-connection)") }
            let prefix = try string(m, "prefix", key)
            if prefix == "A" {
                throw error(m["prefix"]!, "\(key).prefix", "'A' is reserved as the default prefix and cannot be configured (leave `prefix:` out)")
            }
            kind = .redisIndex(storage: try storageSpec(inner, "\(key).storage"),
                               redis: try redisSpec(redisNode, "\(key).redis"), prefix: prefix)
        case "!redis-connection":
            throw error(node, key, "a !redis-connection is not a storage; use it as the `redis:` of a !redis-index")
        case "!remote-storage":
            let m = try mapping(node, key, allowed: ["url", "instance-name", "request-timeout", "retries", "max-backoff",
                                                     "credentials", "channel-options"])
            var spec = RemoteSpec(url: try string(m, "url", key, required: true)!)
            spec.instanceName = try string(m, "instance-name", key) ?? ""
            if let t = try duration(m, "request-timeout", key) {
                guard t > 0 else { throw error(m["request-timeout"]!, "\(key).request-timeout", "must be positive") }
                spec.requestTimeout = t
            }
            if let r = try int(m, "retries", key, range: 0...100) { spec.retries = r }
            if let b = try duration(m, "max-backoff", key) { spec.maxBackoff = b }
            if let c = m["credentials"] {
                let ck = "\(key).credentials"
                let cm = try mapping(c, ck, allowed: ["tls-server-cert", "tls-client-key", "tls-client-cert", "auth-token",
                                                      "token-refresh-seconds"])
                spec.tlsServerCert = try string(cm, "tls-server-cert", ck).map(absolutePath)
                spec.tlsClientKey = try string(cm, "tls-client-key", ck).map(absolutePath)
                spec.tlsClientCert = try string(cm, "tls-client-cert", ck).map(absolutePath)
                spec.authToken = try string(cm, "auth-token", ck).map(absolutePath)
                spec.tokenRefreshSeconds = try duration(cm, "token-refresh-seconds", ck)
            }
            if let o = m["channel-options"] {
                let ok = "\(key).channel-options"
                guard let om = o.mapping else { throw error(o, ok, "expected a mapping of gRPC channel options") }
                for (k, v) in om {
                    guard let name = k.string else { throw error(k, ok, "keys must be strings") }
                    guard var text = try scalarText(v, "\(ok).\(name)") else { throw error(v, "\(ok).\(name)", "needs a value") }
                    // A YAML boolean is what Python passes to gRPC as 1 or 0.
                    if v.tag.rawValue == "tag:yaml.org,2002:bool", let b = yamlBool(text) { text = b ? "1" : "0" }
                    spec.channelOptions[name] = text
                }
            }
            kind = .remote(spec)
        case "!sharded-storage":
            kind = .sharded(try shardedSpec(node, key))
        case "!replicated-storage":
            kind = .replicated(try replicatedSpec(node, key))
        case "!size-differentiated-storage":
            kind = .sizeDifferentiated(try sizeDifferentiatedSpec(node, key))
        default:
            if unsupportedBuildGridTags.contains(tag) {
                throw error(node, key, "BuildGrid's \(tag) is not supported by casfs; supported storage tags: \(supportedStorageTags.joined(separator: ", "))")
            }
            let what = tag.hasPrefix("!") ? "unknown storage tag \(tag)" : "expected a storage node (a tag such as !disk-storage)"
            throw error(node, key, "\(what); known: \(supportedStorageTags.joined(separator: ", "))")
        }
        let id = nextID
        nextID += 1
        var spec = StorageNode(id: id, path: key, kind: kind, line: node.mark?.line)
        for (k, v) in node.mapping ?? [:] {
            guard let name = k.string else { continue }
            if let line = v.mark?.line { spec.keyLines[name] = line }
            // Keys one level down (`credentials.auth-token`), for errors found while building.
            for (k2, v2) in v.mapping ?? [:] {
                if let inner = k2.string, let line = v2.mark?.line { spec.keyLines["\(name).\(inner)"] = line }
            }
        }
        storageIDs[node] = id
        storages[id] = spec
        return spec
    }

    // MARK: composite storages

    func shardedSpec(_ node: Node, _ key: String) throws -> ShardedSpec {
        let m = try mapping(node, key, allowed: ["shards", "thread-pool-size"])
        var firstUse: [String: String] = [:]
        var shards: [ShardedSpec.Shard] = []
        for (item, path) in try items(m, "shards", key, of: node, atLeast: 1) {
            let sm = try mapping(item, path, allowed: ["name", "storage"])
            guard let nameNode = sm["name"] else { throw error(item, path, "missing `name:`") }
            let name = try string(sm, "name", path, required: true)!
            guard ShardedStorage.isValidName(name) else {
                throw error(nameNode, "\(path).name", "'\(name)' is not a shard name (letters, digits and '-' only, as BuildGrid requires)")
            }
            if let other = firstUse[name] {
                throw error(nameNode, "\(path).name", "duplicate shard name '\(name)' (also \(other).name)")
            }
            firstUse[name] = path
            guard let storageNode = sm["storage"] else { throw error(item, path, "missing `storage:`") }
            shards.append(ShardedSpec.Shard(name: name, storage: try storageSpec(storageNode, "\(path).storage")))
        }
        var spec = ShardedSpec(shards: shards)
        if let n = try int(m, "thread-pool-size", key, range: 0...1024) { spec.threadPoolSize = n }
        return spec
    }

    func replicatedSpec(_ node: Node, _ key: String) throws -> ReplicatedSpec {
        let m = try mapping(node, key, allowed: ["storages", "replication-queue-size", "replication-threads", "read-replication"])
        var spec = ReplicatedSpec(storages: try items(m, "storages", key, of: node, atLeast: 2).map { item, path in
            try storageSpec(item, path)
        })
        if let n = try int(m, "replication-queue-size", key, range: 0...10_000_000) { spec.replicationQueueSize = n }
        if let n = try int(m, "replication-threads", key, range: 1...1024) { spec.replicationThreads = n }
        if let b = try bool(m, "read-replication", key) { spec.readReplication = b }
        return spec
    }

    func sizeDifferentiatedSpec(_ node: Node, _ key: String) throws -> SizeDifferentiatedSpec {
        let m = try mapping(node, key, allowed: ["size-limited-storages", "fallback", "thread-pool-size"])
        let tiers = try items(m, "size-limited-storages", key, of: node, atLeast: 1).map { item, path in
            let tm = try mapping(item, path, allowed: ["max-size", "storage"])
            guard tm["max-size"] != nil else { throw error(item, path, "missing `max-size:`") }
            guard let storageNode = tm["storage"] else { throw error(item, path, "missing `storage:`") }
            return SizeDifferentiatedSpec.Tier(maxSize: try size(tm, "max-size", path, required: true)!,
                                               storage: try storageSpec(storageNode, "\(path).storage"))
        }
        guard let fallbackNode = m["fallback"] else { throw error(node, key, "missing `fallback:`") }
        var spec = SizeDifferentiatedSpec(tiers: tiers, fallback: try storageSpec(fallbackNode, "\(key).fallback"))
        if let n = try int(m, "thread-pool-size", key, range: 0...1024) { spec.threadPoolSize = n }
        return spec
    }

    /// The entries of the list under `name`, each with its place
    /// (`storage.shards[0]`).
    func items(_ m: [String: Node], _ name: String, _ key: String, of parent: Node, atLeast minimum: Int) throws -> [(Node, String)] {
        let path = "\(key).\(name)"
        guard let node = m[name] else { throw error(parent, key, "missing `\(name):`") }
        guard let seq = node.sequence else { throw error(node, path, "expected a list") }
        guard seq.count >= minimum else {
            throw error(node, path, minimum == 1 ? "needs at least one entry" : "needs at least \(minimum) entries")
        }
        return seq.enumerated().map { i, item in (item, "\(path)[\(i)]") }
    }

    func redisSpec(_ node: Node, _ key: String) throws -> RedisSpec {
        if let r = redisSpecs[node] { return r }
        guard node.tag.rawValue == "!redis-connection" else {
            throw error(node, key, "expected a !redis-connection")
        }
        let m = try mapping(node, key, allowed: [
            "host", "port", "password", "db", "unix-socket", "retries", "protocol",
            "connect-timeout", "command-timeout", "max-connections",
            "sentinel-master-name", "dns-srv-record", "sentinels", "dns-servers",
            "durable-replicas", "durable-timeout", "durable-shortfall", "read-from-replicas",
        ])
        var r = RedisSpec(id: nextID)
        nextID += 1
        r.host = try string(m, "host", key)
        r.port = try int(m, "port", key, range: 1...65535)
        r.unixSocket = try string(m, "unix-socket", key).map(absolutePath)
        r.password = try string(m, "password", key)
        r.db = try int(m, "db", key, range: 0...Int(Int32.max)) ?? 0
        r.connectTimeout = try duration(m, "connect-timeout", key)
        r.commandTimeout = try duration(m, "command-timeout", key)
        r.maxConnections = try int(m, "max-connections", key, range: 1...10_000)
        r.retries = try int(m, "retries", key, range: 0...100) ?? RedisSpec.defaultRetries
        if let p = try int(m, "protocol", key), p != 2 {
            throw error(m["protocol"]!, "\(key).protocol", "only RESP protocol 2 is supported")
        }
        r.sentinelMasterName = try nonEmpty(m, "sentinel-master-name", key)
        r.dnsSRVRecord = try nonEmpty(m, "dns-srv-record", key)
        r.sentinels = try hostPorts(m, "sentinels", key, defaultPort: 26379)
        r.dnsServers = try hostPorts(m, "dns-servers", key, defaultPort: 53)
        r.durableReplicas = try int(m, "durable-replicas", key, range: 0...100)
        if let t = try duration(m, "durable-timeout", key) {
            guard t > 0, t <= 3600 else {
                throw error(m["durable-timeout"]!, "\(key).durable-timeout", "must be more than 0 and at most 1h")
            }
            r.durableTimeout = t
        }
        r.durableShortfall = try string(m, "durable-shortfall", key)
        if let v = r.durableShortfall, !["fail", "accept-if-replicas-down", "accept"].contains(v) {
            throw error(m["durable-shortfall"]!, "\(key).durable-shortfall", "expected fail, accept-if-replicas-down or accept")
        }
        r.readFromReplicas = try bool(m, "read-from-replicas", key) ?? false
        try checkRedisCombination(r, m, node, key)
        r.path = key
        for (k, v) in m { if let line = v.mark?.line { r.keyLines[k] = line } }
        redisSpecs[node] = r
        return r
    }

    /// Keys of a `!redis-connection` that would be ignored, or contradict
    /// each other, in the combination given.
    private func checkRedisCombination(_ r: RedisSpec, _ m: [String: Node], _ node: Node, _ key: String) throws {
        func fail(_ name: String, _ message: String) -> ConfigError { error(m[name] ?? node, "\(key).\(name)", message) }
        if r.unixSocket == nil && r.host == nil && r.dnsSRVRecord == nil && r.sentinels.isEmpty {
            throw error(node, key, "needs `host:` (and `port:`), `unix-socket:`, `dns-srv-record:` or `sentinels:`")
        }
        if r.unixSocket != nil {
            for other in ["host", "port", "dns-srv-record", "sentinel-master-name", "sentinels"] where m[other] != nil {
                throw fail(other, "a !redis-connection with `unix-socket:` takes no `\(other):` (the socket is the server)")
            }
        }
        if r.dnsSRVRecord != nil && r.host != nil {
            throw fail("dns-srv-record", "give either `host:`/`port:` or `dns-srv-record:`, not both (as BuildGrid)")
        }
        if !r.sentinels.isEmpty {
            guard r.sentinelMasterName != nil else {
                throw fail("sentinels", "sentinels are asked for a master: set `sentinel-master-name:` too")
            }
            if r.host != nil {
                throw fail("sentinels", "give the sentinel either as `host:`/`port:` or in `sentinels:`, not both")
            }
            if r.dnsSRVRecord != nil {
                throw fail("sentinels", "with `dns-srv-record:` the record's targets are the sentinels; leave `sentinels:` out")
            }
        }
        if !r.dnsServers.isEmpty && r.dnsSRVRecord == nil {
            throw fail("dns-servers", "DNS servers are asked for `dns-srv-record:`, which is not set")
        }
        if r.readFromReplicas && r.sentinelMasterName == nil {
            throw fail("read-from-replicas", "replicas are found through Redis Sentinel: set `sentinel-master-name:` too")
        }
    }

    // MARK: mount options

    func mountOptions(_ node: Node, _ key: String) throws -> MountOptions {
        let m = try mapping(node, key, allowed: [
            "writable", "entry-timeout", "attr-timeout", "negative-timeout", "threads",
            "allow-other", "max-read", "fs-name", "tree-cache-size", "tree-prefetch", "tree-directory-mode",
            "metrics-address", "scrub-interval", "scrub-rate",
        ])
        var o = MountOptions()
        if let v = try bool(m, "writable", key) { o.writable = v }
        if let v = try duration(m, "entry-timeout", key) { o.entryTimeout = v }
        if let v = try duration(m, "attr-timeout", key) { o.attrTimeout = v }
        if let v = try duration(m, "negative-timeout", key) { o.negativeTimeout = v }
        if let v = try int(m, "threads", key, range: 0...256) { o.threads = v }
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
        if let v = try duration(m, "scrub-interval", key) { o.scrubInterval = v }
        if let (node, text) = try value(m, "scrub-rate", key, required: false) {
            guard let v = parseRate(text) else {
                throw error(node, "\(key).scrub-rate", "'\(text)' is not a rate (MiB per second, or a size per second such as 50M)")
            }
            o.scrubRate = v
        }
        if let v = try string(m, "tree-directory-mode", key) {
            guard let mode = MountOptions.parseMode(v) else {
                throw error(m["tree-directory-mode"]!, "\(key).tree-directory-mode", "'\(v)' is not an octal mode (e.g. 0755)")
            }
            o.treeDirectoryMode = mode
        }
        if let v = try string(m, "metrics-address", key) {
            do { o.metricsAddress = try ListenAddress(parsing: v) } catch {
                throw self.error(m["metrics-address"]!, "\(key).metrics-address", error.description)
            }
        }
        return o
    }

    // MARK: typed accessors, each naming the key and line on error

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

    /// The text of a scalar, with BuildGrid's scalar tags applied; nil for
    /// YAML's null. Any other explicit tag is an error.
    func scalarText(_ node: Node, _ key: String) throws -> String? {
        guard case .scalar(let s) = node else { throw error(node, key, "expected a single value") }
        let tag = node.tag.rawValue
        if tag.hasPrefix("tag:yaml.org,2002:") {
            return tag == "tag:yaml.org,2002:null" ? nil : s.string
        }
        guard let scalarTag = ScalarTag(rawValue: tag) else {
            throw error(node, key, "unknown tag \(tag) on a value (known: !expand-vars, !expand-path, !read-file)")
        }
        do {
            return try scalarTag.apply(s.string, environment: environment)
        } catch {
            throw self.error(node, key, error.message)
        }
    }

    func value(_ m: [String: Node], _ name: String, _ key: String, required: Bool) throws -> (Node, String)? {
        guard let node = m[name] else {
            if required { throw ConfigError(source: source, line: nil, key: "\(key).\(name)", message: "missing") }
            return nil
        }
        guard let text = try scalarText(node, "\(key).\(name)") else {
            if required { throw error(node, "\(key).\(name)", "must not be empty") }
            return nil
        }
        return (node, text)
    }

    func string(_ m: [String: Node], _ name: String, _ key: String, required: Bool = false) throws -> String? {
        try value(m, name, key, required: required)?.1
    }

    func int(_ m: [String: Node], _ name: String, _ key: String, range: ClosedRange<Int>? = nil) throws -> Int? {
        guard let (node, text) = try value(m, name, key, required: false) else { return nil }
        guard let v = Int(text.trimmingCharacters(in: .whitespaces)) else {
            throw error(node, "\(key).\(name)", "expected a whole number, got '\(text)'")
        }
        if let range, !range.contains(v) {
            throw error(node, "\(key).\(name)", "must be between \(range.lowerBound) and \(range.upperBound)")
        }
        return v
    }

    /// A string that, when given, is not empty.
    func nonEmpty(_ m: [String: Node], _ name: String, _ key: String) throws -> String? {
        guard let (node, text) = try value(m, name, key, required: false) else { return nil }
        guard !text.trimmingCharacters(in: .whitespaces).isEmpty else { throw error(node, "\(key).\(name)", "must not be empty") }
        return text
    }

    /// A list of `host:port` (or `[v6]:port`; the port may be left out),
    /// or one such string, each checked.
    func hostPorts(_ m: [String: Node], _ name: String, _ key: String, defaultPort: Int) throws -> [String] {
        let items: [(Node, String)]
        if let seq = m[name]?.sequence {
            items = seq.enumerated().map { ($1, "\(key).\(name)[\($0)]") }
        } else {
            items = m[name].map { [($0, "\(key).\(name)")] } ?? []
        }
        return try items.map { node, path in
            guard let text = try scalarText(node, path) else { throw error(node, path, "needs a value") }
            guard RedisHostPort(parsing: text, defaultPort: defaultPort) != nil else {
                throw error(node, path, "'\(text)' is not host:port (port 1 to 65535; [v6]:port for IPv6)")
            }
            return text
        }
    }

    /// A list of strings (or one string).
    func list(_ m: [String: Node], _ name: String, _ key: String) throws -> [String] {
        guard let node = m[name] else { return [] }
        if let seq = node.sequence {
            return try seq.enumerated().map { i, item in
                guard let t = try scalarText(item, "\(key).\(name)[\(i)]") else { throw error(item, "\(key).\(name)[\(i)]", "needs a value") }
                return t
            }
        }
        return try scalarText(node, "\(key).\(name)").map { [$0] } ?? []
    }

    func bool(_ m: [String: Node], _ name: String, _ key: String) throws -> Bool? {
        guard let (node, text) = try value(m, name, key, required: false) else { return nil }
        guard let b = yamlBool(text) else { throw error(node, "\(key).\(name)", "expected true or false, got '\(text)'") }
        return b
    }

    /// YAML 1.1 booleans, as BuildGrid's (PyYAML) parser reads them.
    func yamlBool(_ text: String) -> Bool? {
        switch text.lowercased() {
        case "true", "yes", "on", "y": return true
        case "false", "no", "off", "n": return false
        default: return nil
        }
    }

    func size(_ m: [String: Node], _ name: String, _ key: String, required: Bool = false) throws -> Int64? {
        guard let (node, text) = try value(m, name, key, required: required) else { return nil }
        guard let v = parseByteSize(text) else {
            throw error(node, "\(key).\(name)", "'\(text)' is not a size (bytes, or a number with K, M, G or T, below 4E)")
        }
        return v
    }

    func duration(_ m: [String: Node], _ name: String, _ key: String) throws -> Double? {
        guard let (node, text) = try value(m, name, key, required: false) else { return nil }
        guard let v = parseDuration(text) else {
            throw error(node, "\(key).\(name)", "'\(text)' is not a duration (seconds, or 90s, 15m, 2h, 7d)")
        }
        return v
    }

    func absolutePath(_ path: String) -> String { makeAbsolute(path) }

    func error(_ node: Node, _ key: String, _ message: String) -> ConfigError {
        ConfigError(source: source, line: node.mark?.line, key: key, message: message)
    }
}

/// `~/x` → `$HOME/x`; a relative path → absolute from the current directory
/// (so a daemon may change directory later).
func makeAbsolute(_ path: String) -> String {
    var p = path
    if p.hasPrefix("~/"), let home = ProcessInfo.processInfo.environment["HOME"] { p = home + p.dropFirst() }
    if !p.hasPrefix("/") { p = FileManager.default.currentDirectoryPath + "/" + p }
    return URL(fileURLWithPath: p).standardizedFileURL.path
}
