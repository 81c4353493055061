import CASCore
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import REAPI
import Synchronization

let log = Logger(label: "casfs.remote")
/// Failures a server (or whoever controls it) can repeat at will are folded.
let folded = LogFolder(logger: log)

typealias REDigest = Build_Bazel_Remote_Execution_V2_Digest
typealias CASClient = Build_Bazel_Remote_Execution_V2_ContentAddressableStorage.Client<HTTP2ClientTransport.Posix>
typealias CapabilitiesClient = Build_Bazel_Remote_Execution_V2_Capabilities.Client<HTTP2ClientTransport.Posix>
typealias ByteStreamClient = Google_Bytestream_ByteStream.Client<HTTP2ClientTransport.Posix>

/// A Remote Execution API v2 content-addressable store reached over gRPC
/// (BuildGrid, Buildbarn, bazel-remote, ...), as a synchronous `Storage`.
///
/// - Small blobs go through BatchReadBlobs / BatchUpdateBlobs, batches split
///   to stay under the server's per-request limit (a single blob only up to
///   4 MiB, however large the server's limit); larger blobs through
///   ByteStream (`blobs/<hash>/<size>` to read, with read_offset/read_limit
///   for ranges; `uploads/<uuid>/blobs/<hash>/<size>` to write, in 1 MiB
///   chunks, resumed after QueryWriteStatus when a stream breaks).
/// - A non-empty instance name prefixes every resource name.
/// - Every call has a deadline (`requestTimeout`; streams get more time in
///   proportion to their size) and is retried on UNAVAILABLE, ABORTED and
///   RESOURCE_EXHAUSTED, `retries` times, sleeping as BuildGrid's client does
///   (`RetryBackoff`: min(2^(n-1) + jitter, maxBackoff) s). A server that is
///   gone yields `StorageError.unavailable` rather than a hang.
/// - TLS for `https://` and `grpcs://` URLs, with the trust roots, client
///   certificate and bearer token of `RemoteCredentials`; every credential
///   file is read when the storage is created (a missing one throws
///   `RemoteSetupError`), while a server that refuses the token or the
///   certificate only makes calls fail (`StorageError.unavailable`).
/// - `channelOptions`: BuildGrid's `channel-options` (`ChannelOptions`).
/// - A REAPI CAS cannot delete: deletes are logged no-ops.
///
/// The methods are blocking: each runs its calls on Swift concurrency's pool
/// and waits on a semaphore. Call them from ordinary threads (FUSE workers,
/// command-line code), not from async tasks.
public final class RemoteStorage: Storage, @unchecked Sendable {
    /// Where the server is, parsed from `http://`, `https://`, `grpc://` or
    /// `grpcs://` URLs (a bare `host:port` is plaintext).
    public struct Endpoint: Sendable, Equatable, CustomStringConvertible {
        public var host: String
        public var port: Int
        public var secure: Bool

        public init(host: String, port: Int, secure: Bool) {
            self.host = host
            self.port = port
            self.secure = secure
        }

        public init(url: String) throws {
            var rest = Substring(url)
            var secure = false
            if let r = rest.range(of: "://") {
                let scheme = rest[..<r.lowerBound].lowercased()
                switch scheme {
                case "http", "grpc": secure = false
                case "https", "grpcs": secure = true
                default: throw StorageError.unsupported("remote URL scheme '\(scheme)' (use http, https, grpc or grpcs)")
                }
                rest = rest[r.upperBound...]
            }
            if let slash = rest.firstIndex(of: "/") {
                guard rest[slash...].allSatisfy({ $0 == "/" }) else {
                    throw StorageError.unsupported("a path in the remote URL '\(url)'; use instance-name")
                }
                rest = rest[..<slash]
            }
            var host: Substring
            var portText: Substring?
            if rest.hasPrefix("[") {
                guard let close = rest.firstIndex(of: "]") else { throw StorageError.invalidDigest("bad remote URL '\(url)'") }
                host = rest[rest.index(after: rest.startIndex)..<close]
                let after = rest[rest.index(after: close)...]
                if after.hasPrefix(":") { portText = after.dropFirst() }
            } else if let colon = rest.lastIndex(of: ":") {
                host = rest[..<colon]
                portText = rest[rest.index(after: colon)...]
            } else {
                host = rest
            }
            guard !host.isEmpty else { throw StorageError.unsupported("remote URL '\(url)' has no host") }
            var port = secure ? 443 : 80
            if let portText {
                guard let p = Int(portText), (1...65535).contains(p) else {
                    throw StorageError.unsupported("remote URL '\(url)' has a bad port")
                }
                port = p
            }
            self.init(host: String(host), port: port, secure: secure)
        }

        public var description: String {
            let h = host.contains(":") ? "[\(host)]" : host
            return "\(secure ? "grpcs" : "grpc")://\(h):\(port)"
        }
    }

    public let endpoint: Endpoint
    public let instanceName: String
    public let requestTimeout: Double
    public let retries: Int
    /// Seconds; the cap on one sleep between retries.
    public var maxBackoff: Double { backoff.maxBackoff }
    public let credentials: RemoteCredentials
    public let channelOptions: ChannelOptions
    /// Where large blobs fetched by `getBlob` are spooled (unnamed files).
    public let temporaryDirectory: String
    /// ByteStream chunk size for uploads (1 MiB, less under a small
    /// `max-send-message-length`).
    public let chunkSize: Int
    /// Compressors the server lists in its capabilities (empty until asked,
    /// or when it lists none). casfs transfers blobs uncompressed.
    public var serverCompressors: [Build_Bazel_Remote_Execution_V2_Compressor.Value] {
        compressors.withLock { $0 }
    }

    private let client: GRPCClient<HTTP2ClientTransport.Posix>
    private let runner: Task<Void, Never>
    private let stopping: Flag
    /// Bytes allowed in one batch request (server limit less headroom).
    private let batchLimit = Atomic<Int>(4 << 20)
    private let capabilitiesAsked = Atomic<Bool>(false)
    private let compressors = Mutex<[Build_Bazel_Remote_Execution_V2_Compressor.Value]>([])
    private let backoff: RetryBackoff
    /// Largest message accepted from the server (the deadline grows with it).
    private let receiveLimit: Int
    /// Largest request casfs builds.
    private let sendLimit: Int
    private let deleteWarned = Atomic<Bool>(false)
    /// The largest range read at once: lowered when a range stalls (no
    /// answer within the stall timeout) and raised again as ranges succeed.
    private let rangeCap = Atomic<Int64>(64 << 20)
    private let rangeSuccesses = Atomic<Int>(0)
    /// When a ByteStream read last received bytes (nanoseconds since
    /// `clockBase`): whether the server is alive while a range stalls.
    private let lastProgress = Atomic<Int64>(.min)
    private let clockBase = ContinuousClock.now
    /// Failed calls and retries, when a scope was given.
    private let errorCount: MetricCounter?
    private let retryCount: MetricCounter?

    /// Default per-request limit when the server does not say (BuildGrid's and Bazel's 4 MiB).
    static let defaultBatchLimit = 4 << 20
    /// The most one batch may carry, whatever the server allows.
    static let maxBatchLimit = 64 << 20
    /// The largest single blob `getBlob` and `commitWrite` hold in memory
    /// for a batch call, whatever the server's batch limit; larger ones go
    /// through ByteStream (to or from a file).
    static let maxBufferedBlob = defaultBatchLimit - batchHeadroom - perBlobOverhead
    /// Ranges a stalled read is split down to, at the least; also the range
    /// read to tell a hung server from one that stalls only large ranges.
    static let minRange: Int64 = 16 << 10
    /// Most memory reserved ahead for one read (the rest grows as bytes come).
    static let maxReserve = 64 << 20
    /// Ranges of a whole-blob download (several in flight).
    static let downloadChunk: Int64 = 4 << 20
    static let downloadParallelism = 4
    /// The slowest a blob may come and still be waited for (besides `requestTimeout`).
    static let minimumRate: Double = 262_144
    /// Room kept in each batch request for names, digests and framing.
    static let batchHeadroom = 64 << 10
    /// Per-blob framing allowance inside a batch.
    static let perBlobOverhead = 160
    /// Message size limit when `max-receive-message-length` is not set.
    static let defaultReceiveLimit = 64 << 20
    /// Upload chunk size when `max-send-message-length` allows it.
    static let defaultChunkSize = 1 << 20
    /// Longest `request-timeout` accepted (about 115 days).
    static let maxRequestTimeout: Double = 10_000_000

    public convenience init(url: String, instanceName: String = "", requestTimeout: Double = 60,
                            retries: Int = RetryBackoff.defaultRetries,
                            maxBackoff: Double = RetryBackoff.defaultMaxBackoff,
                            credentials: RemoteCredentials = .none,
                            channelOptions: [String: String] = [:],
                            temporaryDirectory: String? = nil,
                            metrics: MetricScope? = nil) throws {
        try self.init(endpoint: Endpoint(url: url), instanceName: instanceName, requestTimeout: requestTimeout,
                      retries: retries, maxBackoff: maxBackoff, credentials: credentials,
                      channelOptions: channelOptions, temporaryDirectory: temporaryDirectory, metrics: metrics)
    }

    /// Sets up the channel; nothing is sent until the first call. Throws
    /// `RemoteSetupError` for a credential file that cannot be read (naming
    /// the key and path), an unknown channel option, or a number out of range.
    ///
    /// - Parameters:
    ///   - requestTimeout: seconds per call (BuildGrid's `request-timeout`;
    ///     BuildGrid sets no deadline when it is absent, casfs uses 60 s so
    ///     that no caller waits forever).
    ///   - retries: BuildGrid's `retries` (default 3).
    ///   - maxBackoff: BuildGrid's `max-backoff`, seconds (default 64).
    ///   - credentials: BuildGrid's `credentials`.
    ///   - channelOptions: BuildGrid's `channel-options`, values as text.
    ///   - metrics: where failed calls and retries are counted (nowhere: nil).
    public init(endpoint: Endpoint, instanceName: String = "", requestTimeout: Double = 60,
                retries: Int = RetryBackoff.defaultRetries,
                maxBackoff: Double = RetryBackoff.defaultMaxBackoff,
                credentials: RemoteCredentials = .none,
                channelOptions: [String: String] = [:],
                temporaryDirectory: String? = nil,
                metrics: MetricScope? = nil) throws {
        guard requestTimeout.isFinite, requestTimeout > 0, requestTimeout <= Self.maxRequestTimeout else {
            throw RemoteSetupError(key: "request-timeout", "must be a positive number of seconds, at most \(Int(Self.maxRequestTimeout))")
        }
        let backoff = try RetryBackoff(retries: retries, maxBackoff: maxBackoff)
        let options = try ChannelOptions(channelOptions)
        self.endpoint = endpoint
        self.instanceName = instanceName.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
        self.requestTimeout = requestTimeout
        self.backoff = backoff
        self.retries = backoff.retries
        self.credentials = credentials
        self.channelOptions = options
        self.receiveLimit = options.maxReceiveMessageBytes ?? Self.defaultReceiveLimit
        self.sendLimit = options.maxSendMessageBytes ?? ChannelOptions.unlimited
        self.chunkSize = min(Self.defaultChunkSize, sendLimit - (4 << 10))
        self.temporaryDirectory = temporaryDirectory
            ?? ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        self.errorCount = metrics?.counter(MetricCatalog.remoteErrors)
        self.retryCount = metrics?.counter(MetricCatalog.remoteRetries)

        let client = try RemoteChannel.client(endpoint, credentials: credentials, options: options)
        self.client = client
        let where_ = endpoint.description
        let stopping = Flag()
        self.stopping = stopping
        self.runner = Task.detached {
            do { try await client.runConnections() } catch {
                // Shut down before the connections ran: nothing to report.
                if !stopping.isSet {
                    log.error("connection to \(where_) ended: \(error)")
                }
            }
        }
    }

    deinit {
        shutDown()
    }

    public func start() throws {}

    public func stop() throws {
        shutDown()
    }

    private func shutDown() {
        stopping.set()
        client.beginGracefulShutdown()
    }

    // MARK: - Resource names

    private var prefix: String { instanceName.isEmpty ? "" : instanceName + "/" }

    func readResourceName(_ d: Digest) -> String { "\(prefix)blobs/\(d.hash)/\(d.size)" }

    func writeResourceName(_ d: Digest, upload: UUID) -> String {
        "\(prefix)uploads/\(upload.uuidString.lowercased())/blobs/\(d.hash)/\(d.size)"
    }

    // MARK: - Storage

    public func hasBlob(_ digest: Digest) throws -> Bool {
        try missingBlobs([digest]).isEmpty
    }

    public func missingBlobs(_ digests: [Digest]) throws -> [Digest] {
        if digests.isEmpty { return [] }
        var missing: [Digest] = []
        // ~80 bytes per digest on the wire; 20k digests stay well under 4 MiB.
        for start in stride(from: 0, to: digests.count, by: 20_000) {
            let part = Array(digests[start..<min(start + 20_000, digests.count)])
            var req = Build_Bazel_Remote_Execution_V2_FindMissingBlobsRequest()
            req.instanceName = instanceName
            req.blobDigests = part.map(Self.reDigest)
            let resp = try call("FindMissingBlobs") { [self, req] in
                try await CASClient(wrapping: client).findMissingBlobs(req, options: options())
            }
            for m in resp.missingBlobDigests {
                missing.append(try Digest(hash: m.hash, size: m.sizeBytes))
            }
        }
        return missing
    }

    public func getBlob(_ digest: Digest) throws -> BlobSource? {
        if digest.size == 0 {
            return digest.isEmpty ? DataSource(Data()) : nil
        }
        if fitsInMemory(digest.size) {
            let found = try batchRead([digest])
            return found[digest].map { DataSource($0) }
        }
        return try streamToFile(digest)
    }

    /// Ranged ByteStream reads as the blob is read; nothing is fetched ahead.
    public func openBlob(_ digest: Digest) throws -> BlobSource? {
        guard try hasBlob(digest) else { return nil }
        return RangeSource(size: digest.size) { [self] offset, length in
            guard let data = try read(digest, offset: offset, length: length) else {
                throw StorageError.io(errno: EIO, "\(digest) vanished from \(endpoint)")
            }
            return data
        }
    }

    /// A range over ByteStream. A range that stalls is split and its parts
    /// read at once (`readRange`), so a server that cannot send large ranges
    /// still answers the whole request: the kernel never falls back to
    /// 4 KiB reads; a server that answers nothing fails the read
    /// (`unavailable`) after two stall timeouts. The whole read has a
    /// deadline of twice `requestTimeout` plus its size at `minimumRate`.
    public func read(_ digest: Digest, offset: Int64, length: Int) throws -> Data? {
        guard offset >= 0, length >= 0 else { throw StorageError.io(errno: EINVAL, "bad range") }
        if digest.size == 0 { return digest.isEmpty ? Data() : nil }
        if offset >= digest.size || length == 0 {
            // Still answer nil for an absent blob.
            return try hasBlob(digest) ? Data() : nil
        }
        let limit = min(Int64(length), digest.size - offset)
        let overall = overallDeadline(bytes: limit)
        do {
            return try call("ByteStream.Read", bytes: limit, budget: overall) { [self] in
                try await readRange(digest, offset: offset, length: limit, until: .now + .seconds(overall))
            }
        } catch StorageError.io(ENOENT, _) {
            return nil
        }
    }

    /// Seconds a read of `bytes` may take in all (stalls and splits included).
    private func overallDeadline(bytes: Int64) -> Double {
        min(requestTimeout * 2 + Double(max(0, bytes)) / Self.minimumRate, Self.maxRequestTimeout * 2)
    }

    /// How long one range may go without an answer before it counts as stalled.
    private var stallTimeout: Double { min(requestTimeout, 10) }

    /// Reads `[offset, offset + length)`: in parts of at most `rangeCap`
    /// (or `localCap`, when smaller), up to 8 at once.
    ///
    /// A part that gets no answer in time is read again in smaller parts,
    /// down to `minRange`, until `deadline`, but only while the server shows
    /// that it is alive: the part received some bytes (they are kept; the
    /// rest is read), another range received bytes lately, or one small
    /// range (`minRange`) read at once answers. A server that sends nothing
    /// at all fails the read after that small range (`unavailable`), so a
    /// hung server costs a reader two stall timeouts, not the whole deadline.
    /// `rangeCap` is lowered only when a smaller range succeeded where a
    /// larger one stalled, never on a server that answers nothing.
    func readRange(_ d: Digest, offset: Int64, length: Int64, cap localCap: Int64 = .max,
                   until deadline: ContinuousClock.Instant) async throws -> Data {
        let cap = max(Self.minRange, min(localCap, rangeCap.load(ordering: .relaxed)))
        if length > cap {
            let parts = stride(from: offset, to: offset + length, by: Int(cap)).map { ($0, min(cap, offset + length - $0)) }
            var chunks = [Data?](repeating: nil, count: parts.count)
            try await withThrowingTaskGroup(of: (Int, Data).self) { group in
                var next = 0
                func add() {
                    let (i, (o, n)) = (next, parts[next])
                    group.addTask { (i, try await self.readRange(d, offset: o, length: n, cap: localCap, until: deadline)) }
                    next += 1
                }
                while next < min(8, parts.count) { add() }
                while let (i, data) = try await group.next() {
                    chunks[i] = data
                    if next < parts.count { add() }
                }
            }
            var out = Data()
            out.reserveCapacity(Int(min(length, Int64(Self.maxReserve))))
            for c in chunks { out.append(c!) }
            return out
        }
        let started = ContinuousClock.now
        let wait = try attemptTimeout(d, length: length, until: deadline)
        let first = try await readOnce(d, offset: offset, length: length, timeout: wait)
        if first.complete {
            noteRangeServed(length: length, cap: cap, localCap: localCap)
            return first.data
        }
        var got = first.data
        guard ContinuousClock.now < deadline else {
            throw StorageError.unavailable("ByteStream.Read of \(d) from \(endpoint): no answer in time (stalled ranges)")
        }
        if got.isEmpty {
            // Nothing came. Split only while the server shows it is alive.
            if length <= Self.minRange {
                throw StorageError.unavailable("ByteStream.Read of \(d) at \(offset) from \(endpoint): no answer in \(Int(wait)) s")
            }
            if !progressed(since: started - .seconds(stallTimeout)) {
                let n = Self.minRange
                let probe = try await readOnce(d, offset: offset, length: n,
                                               timeout: try attemptTimeout(d, length: n, until: deadline))
                guard !probe.data.isEmpty else {
                    folded.warning(kind: "remote not answering", key: endpoint.description,
                                   "\(endpoint): no answer to a range of \(length) bytes of \(d) in \(Int(wait)) s, nor to one of \(n) bytes; failing the read")
                    throw StorageError.unavailable("ByteStream.Read of \(d) at \(offset) from \(endpoint): no answer in \(Int(wait)) s, nor to a range of \(n) bytes")
                }
                got = probe.data
            }
        }
        let smaller = max(Self.minRange, min(cap, length) / 4)
        rangeSuccesses.store(0, ordering: .relaxed)
        folded.warning(kind: "remote range stalled", key: endpoint.description,
                       "\(endpoint): a range of \(length) bytes of \(d) got no answer in \(Int(wait)) s"
                           + " (\(got.count) bytes came); reading the rest in ranges of \(smaller) bytes")
        let done = Int64(got.count)
        guard done < length else { return got }
        let rest = try await readRange(d, offset: offset + done, length: length - done, cap: smaller, until: deadline)
        got.append(rest)
        return got
    }

    /// Seconds one attempt at `length` bytes may wait for its answer; throws
    /// when `deadline` has passed.
    private func attemptTimeout(_ d: Digest, length: Int64, until deadline: ContinuousClock.Instant) throws -> Double {
        let remaining = deadline - .now
        guard remaining > .zero else {
            throw StorageError.unavailable("ByteStream.Read of \(d) from \(endpoint): no answer in time (stalled ranges)")
        }
        return min(stallTimeout + Double(length) / Double(8 << 20), Double(remaining.components.seconds) + 1)
    }

    /// One ByteStream Read of `[offset, offset + length)` within `timeout`:
    /// the whole range (`complete`), or what came before the deadline passed.
    /// Any other failure is thrown. Every message received counts as
    /// progress of the server (`progressed(since:)`).
    private func readOnce(_ d: Digest, offset: Int64, length: Int64, timeout: Double) async throws -> (data: Data, complete: Bool) {
        var req = Google_Bytestream_ReadRequest()
        req.resourceName = readResourceName(d)
        req.readOffset = offset
        req.readLimit = length
        let received = ReceivedBytes(expected: length)
        do {
            try await ByteStreamClient(wrapping: client).read(req, options: options(timeout: timeout)) { [self] response in
                for try await message in response.messages where !message.data.isEmpty {
                    guard received.append(message.data) else {
                        throw RemoteError.protocolViolation("server sent more than read_limit")
                    }
                    lastProgress.store(nanoseconds(.now), ordering: .relaxed)
                }
            }
        } catch let e as RPCError where e.code == .deadlineExceeded {
            return (received.take(), false)
        }
        let data = received.take()
        guard Int64(data.count) == length else {
            throw StorageError.io(errno: EIO, "ByteStream.Read of \(d) at \(offset): \(data.count) of \(length) bytes")
        }
        return (data, true)
    }

    /// A range came back whole: a smaller range that works where a larger
    /// one stalled becomes the cap for every read; otherwise the cap grows
    /// back, slowly.
    private func noteRangeServed(length: Int64, cap: Int64, localCap: Int64) {
        var current = rangeCap.load(ordering: .relaxed)
        if localCap < current {
            while localCap < current {
                let (exchanged, now) = rangeCap.compareExchange(expected: current, desired: localCap, ordering: .relaxed)
                if exchanged {
                    folded.warning(kind: "remote range cap", key: endpoint.description,
                                   "\(endpoint): larger ranges stall; reading ranges of \(localCap) bytes from now on")
                    break
                }
                current = now
            }
            return
        }
        if length >= cap / 2, rangeSuccesses.add(1, ordering: .relaxed).newValue % 16 == 0, current < (64 << 20) {
            rangeCap.store(min(64 << 20, current * 2), ordering: .relaxed)
        }
    }

    /// True if some ByteStream read received bytes at or after `instant`.
    private func progressed(since instant: ContinuousClock.Instant) -> Bool {
        lastProgress.load(ordering: .relaxed) >= nanoseconds(instant)
    }

    private func nanoseconds(_ instant: ContinuousClock.Instant) -> Int64 {
        let c = (instant - clockBase).components
        return c.seconds &* 1_000_000_000 &+ c.attoseconds / 1_000_000_000
    }

    public func deleteBlob(_ digest: Digest) throws {
        warnDelete()
    }

    public func bulkDelete(_ digests: [Digest]) -> [String] {
        if !digests.isEmpty { warnDelete() }
        return []
    }

    public func commitWrite(_ digest: Digest, _ source: BlobSource) throws {
        guard source.size == digest.size else {
            throw StorageError.sizeMismatch(expected: digest, actualSize: source.size)
        }
        if digest.size == 0 { return }  // every REAPI CAS has the empty blob
        if fitsInMemory(digest.size) {
            let data = try source.readAll()
            if let e = try batchUpdate([(digest, data)]).first ?? nil { throw e }
            return
        }
        try streamUpload(digest, source)
    }

    public func bulkUpdateBlobs(_ blobs: [(Digest, Data)]) -> [StorageError?] {
        var results = [StorageError?](repeating: nil, count: blobs.count)
        var batch: [(Int, Digest, Data)] = []
        var batchBytes = 0
        func flush() {
            guard !batch.isEmpty else { return }
            do {
                let statuses = try batchUpdate(batch.map { ($0.1, $0.2) })
                for (i, s) in zip(batch.map(\.0), statuses) { results[i] = s }
            } catch {
                for (i, _, _) in batch { results[i] = StorageError.wrap(error) }
            }
            batch = []
            batchBytes = 0
        }
        for (i, (d, data)) in blobs.enumerated() {
            guard Int64(data.count) == d.size else {
                results[i] = .sizeMismatch(expected: d, actualSize: Int64(data.count))
                continue
            }
            if d.size == 0 { continue }
            if !fitsInBatch(d.size) {
                do { try streamUpload(d, DataSource(data)) } catch { results[i] = StorageError.wrap(error) }
                continue
            }
            let cost = data.count + Self.perBlobOverhead
            if batchBytes + cost > currentBatchLimit() { flush() }
            batch.append((i, d, data))
            batchBytes += cost
        }
        flush()
        return results
    }

    public func bulkReadBlobs(_ digests: [Digest]) throws -> [Digest: Data] {
        var out: [Digest: Data] = [:]
        var batch: [Digest] = []
        var batchBytes = 0
        func flush() throws {
            guard !batch.isEmpty else { return }
            out.merge(try batchRead(batch)) { a, _ in a }
            batch = []
            batchBytes = 0
        }
        for d in Set(digests) {
            if d.size == 0 {
                if d.isEmpty { out[d] = Data() }
                continue
            }
            if !fitsInBatch(d.size) {
                if let src = try streamToFile(d) { out[d] = try src.readAll() }
                continue
            }
            let cost = Int(d.size) + Self.perBlobOverhead
            if batchBytes + cost > currentBatchLimit() { try flush() }
            batch.append(d)
            batchBytes += cost
        }
        try flush()
        return out
    }

    // MARK: - Batches

    private func currentBatchLimit() -> Int {
        askCapabilitiesOnce()
        // A batch is one message each way: it must fit both channel limits.
        let limit = min(batchLimit.load(ordering: .relaxed), sendLimit, receiveLimit)
        return max(limit - Self.batchHeadroom, limit / 2)
    }

    private func fitsInBatch(_ size: Int64) -> Bool {
        // The size comes from a name: near Int64.max the sum would overflow.
        size <= Int64(currentBatchLimit()) - Int64(Self.perBlobOverhead)
    }

    /// Whether one blob on its own goes in a batch call: it fits the batch
    /// and is small enough to hold in memory (`maxBufferedBlob`).
    private func fitsInMemory(_ size: Int64) -> Bool {
        size <= Int64(Self.maxBufferedBlob) && fitsInBatch(size)
    }

    /// Learns the server's batch limit (GetCapabilities) on first use; a server
    /// without the Capabilities service keeps the 4 MiB default.
    private func askCapabilitiesOnce() {
        guard !capabilitiesAsked.load(ordering: .acquiring) else { return }
        var req = Build_Bazel_Remote_Execution_V2_GetCapabilitiesRequest()
        req.instanceName = instanceName
        do {
            let caps = try call("GetCapabilities", retrying: false) { [self, req] in
                try await CapabilitiesClient(wrapping: client).getCapabilities(req, options: options())
            }
            capabilitiesAsked.store(true, ordering: .releasing)
            // The server's own limit (the channel's limits apply on top, in
            // `currentBatchLimit`); a server that names none gets 4 MiB.
            let max = caps.cacheCapabilities.maxBatchTotalSizeBytes
            if max > 0 {
                batchLimit.store(Int(min(max, Int64(Self.maxBatchLimit))), ordering: .relaxed)
            }
            let offered = caps.cacheCapabilities.supportedCompressors
            compressors.withLock { $0 = offered }
            if !offered.isEmpty {
                log.info("\(endpoint) offers compressors \(offered); casfs transfers blobs uncompressed")
            }
        } catch StorageError.unavailable(let m) {
            // Ask again next time; keep the default meanwhile.
            log.debug("GetCapabilities: \(m)")
        } catch {
            capabilitiesAsked.store(true, ordering: .releasing)
            log.debug("GetCapabilities not answered (\(error)); batch limit \(Self.defaultBatchLimit) bytes")
        }
    }

    /// One BatchUpdateBlobs request; a status per blob, in order.
    private func batchUpdate(_ blobs: [(Digest, Data)]) throws -> [StorageError?] {
        var req = Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsRequest()
        req.instanceName = instanceName
        req.requests = blobs.map { d, data in
            var r = Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsRequest.Request()
            r.digest = Self.reDigest(d)
            r.data = data
            return r
        }
        let bytes = Int64(blobs.reduce(0) { $0 + $1.1.count })
        let resp = try call("BatchUpdateBlobs", bytes: bytes) { [self, req] in
            try await CASClient(wrapping: client).batchUpdateBlobs(req, options: options(bytes: bytes))
        }
        var status: [String: Google_Rpc_Status] = [:]
        for r in resp.responses { status["\(r.digest.hash)_\(r.digest.sizeBytes)"] = r.status }
        return blobs.map { d, _ in
            guard let s = status[d.description] else {
                return StorageError.io(errno: EIO, "BatchUpdateBlobs: no status for \(d) from \(endpoint)")
            }
            return s.code == 0 ? nil : Self.storageError(code: s.code, message: s.message, what: "BatchUpdateBlobs \(d)", endpoint: endpoint)
        }
    }

    /// One BatchReadBlobs request; the blobs found. Bytes are not verified here.
    private func batchRead(_ digests: [Digest]) throws -> [Digest: Data] {
        var req = Build_Bazel_Remote_Execution_V2_BatchReadBlobsRequest()
        req.instanceName = instanceName
        req.digests = digests.map(Self.reDigest)
        let bytes = digests.reduce(0) { $0 + $1.size }
        let resp = try call("BatchReadBlobs", bytes: bytes) { [self, req] in
            try await CASClient(wrapping: client).batchReadBlobs(req, options: options(bytes: bytes))
        }
        let asked = Set(digests)
        var out: [Digest: Data] = [:]
        for r in resp.responses {
            // Only blobs asked for; a blob of another length than its digest
            // says is the server's error, not an answer.
            guard let d = try? Digest(hash: r.digest.hash, size: r.digest.sizeBytes), asked.contains(d) else { continue }
            switch r.status.code {
            case 0:
                guard Int64(r.data.count) == d.size else {
                    throw StorageError.io(errno: EIO, "BatchReadBlobs from \(endpoint): \(r.data.count) bytes for \(d)")
                }
                out[d] = r.data
            case Int32(RPCError.Code.notFound.rawValue): continue
            default:
                throw Self.storageError(code: r.status.code, message: r.status.message, what: "BatchReadBlobs \(d)", endpoint: endpoint)
            }
        }
        return out
    }

    // MARK: - ByteStream

    /// Reads the whole blob into an unnamed temporary file; nil if absent.
    /// Ranges of `downloadChunk` bytes are read `downloadParallelism` at a
    /// time (each split further if it stalls, see `readRange`) and written
    /// where they belong; the whole download has the deadline of `read`.
    private func streamToFile(_ digest: Digest) throws -> BlobSource? {
        let fd = try openAnonymousFile(in: temporaryDirectory)
        let source = FileSource(fd: fd, size: digest.size)
        // The ranges are written through a descriptor the download owns: if
        // `call` gives up waiting, its tasks may still be finishing after
        // `source` (and `fd`) are closed here.
        let target = try OwnedDescriptor(duplicating: fd)
        let size = digest.size
        let overall = overallDeadline(bytes: size)
        do {
            try call("ByteStream.Read", bytes: size, budget: overall) { [self] in
                let deadline = ContinuousClock.now + .seconds(overall)
                let chunk = Self.downloadChunk
                try await withThrowingTaskGroup(of: Void.self) { group in
                    var next: Int64 = 0
                    func add() {
                        let o = next
                        next += min(chunk, size - o)
                        group.addTask {
                            let data = try await self.readRange(digest, offset: o, length: min(chunk, size - o), until: deadline)
                            try data.withUnsafeBytes { b in
                                var done = 0
                                while done < b.count {
                                    let r = pwrite(target.fd, b.baseAddress! + done, b.count - done, off_t(o) + off_t(done))
                                    if r < 0 {
                                        if errno == EINTR { continue }
                                        throw StorageError.posix("write of a download")
                                    }
                                    done += r
                                }
                            }
                        }
                    }
                    var started = 0
                    while started < Self.downloadParallelism, next < size {
                        add()
                        started += 1
                    }
                    while try await group.next() != nil {
                        if next < size { add() }
                    }
                }
            }
            return source
        } catch StorageError.io(ENOENT, _) {
            return nil
        }
    }

    /// Uploads `source` over ByteStream Write in `chunkSize` messages. When a
    /// stream breaks (UNAVAILABLE, RESOURCE_EXHAUSTED) the next attempt asks
    /// QueryWriteStatus where the server got to and continues from there.
    private func streamUpload(_ digest: Digest, _ source: BlobSource) throws {
        let name = writeResourceName(digest, upload: UUID())
        let chunk = chunkSize
        let attempts = Counter()
        try call("ByteStream.Write", bytes: digest.size) { [self] in
            var start: Int64 = 0
            if attempts.next() > 0 {
                var q = Google_Bytestream_QueryWriteStatusRequest()
                q.resourceName = name
                do {
                    let status = try await ByteStreamClient(wrapping: client).queryWriteStatus(q, options: options())
                    if status.complete { return }
                    start = max(0, min(status.committedSize, digest.size))
                    log.info("resuming upload of \(digest) at \(start) bytes")
                } catch let e as RPCError where e.code == .notFound || e.code == .unimplemented {
                    start = 0
                }
            }
            let from = start
            let resp = try await ByteStreamClient(wrapping: client).write(options: options(bytes: digest.size - from), requestProducer: { writer in
                var offset = from
                var first = true
                repeat {
                    let n = Int(min(Int64(chunk), digest.size - offset))
                    var m = Google_Bytestream_WriteRequest()
                    if first { m.resourceName = name }
                    first = false
                    m.writeOffset = offset
                    m.data = try source.read(offset: offset, length: n)
                    guard m.data.count == n else { throw StorageError.io(errno: EIO, "short read of the upload source at \(offset)") }
                    offset += Int64(n)
                    m.finishWrite = offset == digest.size
                    try await writer.write(m)
                } while offset < digest.size
            })
            // BuildGrid answers committed_size = size; some servers answer -1
            // when the blob already existed and the stream was cut short.
            if resp.committedSize != digest.size && resp.committedSize != -1 {
                throw StorageError.io(errno: EIO, "ByteStream.Write of \(digest): server committed \(resp.committedSize) bytes")
            }
        }
    }

    // MARK: - Calls: deadlines, retries, blocking bridge

    /// Call options: the deadline grows with the bytes moved (at least 8 MiB/s
    /// is expected on top of `requestTimeout`). Calls fail fast when the
    /// server is unreachable instead of waiting for it.
    private func options(bytes: Int64 = 0, timeout: Double? = nil) -> CallOptions {
        var o = CallOptions.defaults
        o.timeout = .milliseconds(Int64((timeout ?? deadline(bytes: bytes)) * 1000))
        o.waitForReady = false
        // grpc-swift-nio-transport 2.9 limits the messages it *receives* by
        // maxRequestMessageBytes (its deframer's limit) and does not read
        // maxResponseMessageBytes; set both to the receive limit. What casfs
        // sends is bounded by its own batch and chunk sizes (`sendLimit`).
        o.maxRequestMessageBytes = receiveLimit
        o.maxResponseMessageBytes = receiveLimit
        return o
    }

    /// Seconds allowed for one attempt moving `bytes` (checked: `bytes` is a
    /// digest size, at most Int64.max, and the timeout is bounded at init).
    private func deadline(bytes: Int64) -> Double {
        min(requestTimeout + Double(max(0, bytes)) / Double(8 << 20), Self.maxRequestTimeout * 2)
    }

    /// Runs `body` (with retries) on the concurrency pool and blocks until it
    /// finishes. The wait itself is bounded so that a stuck transport cannot
    /// hang the caller.
    /// `budget`: seconds one attempt may take, when not `deadline(bytes:)`.
    private func call<T: Sendable>(_ what: String, bytes: Int64 = 0, retrying: Bool = true, budget attempt: Double? = nil,
                                   _ body: @escaping @Sendable () async throws -> T) throws -> T {
        let box = ResultBox<T>()
        let done = DispatchSemaphore(value: 0)
        let backoff = retrying ? self.backoff : RetryBackoff.none
        let retries = backoff.retries
        let endpoint = self.endpoint
        let retryCount = self.retryCount
        let task = Task.detached {
            var attempt = 0
            while true {
                do {
                    box.set(.success(try await body()))
                    break
                } catch let e as RPCError where attempt < retries && Self.isRetried(e.code) {
                    attempt += 1
                    retryCount?.add()
                    let delay = backoff.delay(afterAttempt: attempt)
                    folded.log(.info, kind: "remote retry", key: "\(endpoint) \(what) \(e.code)",
                               "\(what) to \(endpoint): \(e.code) (\(e.message)); retry \(attempt) of \(retries) in \(String(format: "%.1f", delay)) s")
                    do { try await Task.sleep(for: .milliseconds(Int64(delay * 1000))) } catch {
                        box.set(.failure(e))
                        break
                    }
                } catch {
                    box.set(.failure(error))
                    break
                }
            }
            done.signal()
        }
        let budget = Double(retries + 1) * ((attempt ?? deadline(bytes: bytes)) + 2.5) + backoff.worstCaseTotalDelay + 5
        if done.wait(timeout: .now() + budget) == .timedOut {
            task.cancel()
            errorCount?.add()
            throw StorageError.unavailable("\(what) to \(endpoint): no answer within \(Int(budget)) s")
        }
        switch box.get()! {
        case .success(let v): return v
        case .failure(let e):
            var error = Self.mapError(e, what: what, endpoint: endpoint)
            if !error.isAbsence { errorCount?.add() }
            if let cause = (e as? RPCError)?.cause,
               let why = RemoteTransport.explain(cause: "\(cause)", endpoint, credentials),
               case .unavailable(let m) = error {
                error = .unavailable("\(why): \(m)")
            }
            throw error
        }
    }

    /// BuildGrid's client retries UNAVAILABLE and ABORTED; RESOURCE_EXHAUSTED
    /// is retried too, as servers shed load with it.
    static func isRetried(_ code: RPCError.Code) -> Bool {
        code == .unavailable || code == .aborted || code == .resourceExhausted
    }

    private func warnDelete() {
        if !deleteWarned.exchange(true, ordering: .relaxed) {
            log.notice("delete on remote CAS \(endpoint): a REAPI CAS has no delete call; ignored")
        } else {
            log.debug("delete on remote CAS \(endpoint) ignored")
        }
    }

    // MARK: - Conversions

    static func reDigest(_ d: Digest) -> REDigest {
        var r = REDigest()
        r.hash = d.hash
        r.sizeBytes = d.size
        return r
    }

    static func mapError(_ error: Error, what: String, endpoint: Endpoint) -> StorageError {
        switch error {
        case let e as StorageError: return e
        case let e as RPCError:
            // A failed connection (TLS handshake, refused) says why in its cause.
            let message = e.cause.map { e.message.isEmpty ? "\($0)" : "\(e.message) (\($0))" } ?? e.message
            return storageError(code: Int32(e.code.rawValue), message: message, what: what, endpoint: endpoint)
        case let e as RemoteError:
            return .io(errno: EIO, "\(what) from \(endpoint): \(e)")
        default:
            return .io(errno: EIO, "\(what) to \(endpoint): \(error)")
        }
    }

    /// A google.rpc.Code as a StorageError. NOT_FOUND becomes `io(ENOENT)`,
    /// which callers turn into "absent"; UNAUTHENTICATED and PERMISSION_DENIED
    /// become `unavailable` (EIO), like a server that cannot be reached.
    static func storageError(code: Int32, message: String, what: String, endpoint: Endpoint) -> StorageError {
        let text = "\(what) at \(endpoint)" + (message.isEmpty ? "" : ": \(message)")
        switch Status.Code(rawValue: Int(code)).flatMap(RPCError.Code.init) {
        case .notFound?: return .io(errno: ENOENT, text)
        case .unavailable?, .deadlineExceeded?, .cancelled?: return .unavailable(text)
        case .resourceExhausted?: return .unavailable("\(text) (resource exhausted)")
        case .invalidArgument?, .failedPrecondition?, .outOfRange?: return .rejected(text)
        case .permissionDenied?, .unauthenticated?:
            // The server refuses the credentials (a wrong or expired token):
            // unavailable to casfs until the token file is fixed and re-read.
            return .unavailable("\(text) (credentials refused)")
        case .unimplemented?: return .unsupported(text)
        default: return .io(errno: EIO, "\(text) (gRPC code \(code))")
        }
    }
}

enum RemoteError: Error, CustomStringConvertible {
    case protocolViolation(String)
    var description: String {
        switch self {
        case .protocolViolation(let m): return "protocol violation: \(m)"
        }
    }
}

private final class ResultBox<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Result<T, Error>?
    func set(_ v: Result<T, Error>) { lock.lock(); value = v; lock.unlock() }
    func get() -> Result<T, Error>? { lock.lock(); defer { lock.unlock() }; return value }
}

private final class Counter: Sendable {
    private let value = Atomic<Int>(0)
    /// The count before this call.
    func next() -> Int { value.add(1, ordering: .relaxed).oldValue }
}

/// The bytes of one ByteStream read as they come, at most `expected`.
private final class ReceivedBytes: Sendable {
    private let expected: Int64
    private let data = Mutex(Data())

    init(expected: Int64) { self.expected = expected }

    /// False (and nothing kept) if `more` would go past `expected`.
    func append(_ more: Data) -> Bool {
        data.withLock { d in
            guard Int64(more.count) <= expected - Int64(d.count) else { return false }
            if d.isEmpty { d.reserveCapacity(Int(min(expected, Int64(RemoteStorage.maxReserve)))) }
            d.append(more)
            return true
        }
    }

    /// The bytes received; the buffer is handed over, not copied.
    func take() -> Data {
        data.withLock { d in
            let out = d
            d = Data()
            return out
        }
    }
}

/// A descriptor of its own (a duplicate, close-on-exec), closed when the
/// last task holding it lets go: work that outlives its caller never
/// writes through a number the caller closed and the process reused.
private final class OwnedDescriptor: Sendable {
    let fd: Int32

    init(duplicating fd: Int32) throws {
        let dup = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        guard dup >= 0 else { throw StorageError.posix("dup of a download file") }
        self.fd = dup
    }

    deinit { close(fd) }
}

private final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
}

private extension StorageError {
    /// NOT_FOUND as `storageError` maps it: the server answered that a blob
    /// is absent, which is an answer, not a failed call.
    var isAbsence: Bool {
        if case .io(ENOENT, _) = self { return true }
        return false
    }
}
