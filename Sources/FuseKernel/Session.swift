import Foundation
import Glibc
import Synchronization

/// What the filesystem asks of the kernel at INIT (masked by what the
/// kernel offers).
public struct FuseInitReply: Sendable {
    public var flags: FuseInitFlags
    public var maxReadahead: UInt32
    public var maxWrite: UInt32
    public var maxBackground: UInt16 = 64
    public var congestionThreshold: UInt16 = 48
    public var timeGranularity: UInt32 = 1
    /// How many filesystems may stack under a passthrough backing file (1 or 2).
    public var maxStackDepth: UInt32 = 1

    public init(flags: FuseInitFlags, maxReadahead: UInt32, maxWrite: UInt32) {
        self.flags = flags
        self.maxReadahead = maxReadahead
        self.maxWrite = maxWrite
    }
}

/// What was agreed at INIT.
public struct FuseConnectionInfo: Sendable {
    public var minor: UInt32
    /// What the kernel offered.
    public var offered: FuseInitFlags
    /// What both sides agreed on.
    public var flags: FuseInitFlags
    public var maxWrite: UInt32
    public var maxReadahead: UInt32
}

/// A filesystem served by a `FuseSession`.
public protocol FuseFileSystem: AnyObject, Sendable {
    /// Chooses the INIT reply from the kernel's offer.
    func negotiate(_ offer: FuseInitIn) -> FuseInitReply
    /// INIT was answered.
    func connected(_ info: FuseConnectionInfo, _ channel: FuseChannel)
    /// Answers one request: exactly one reply through `reply` (FORGET: `none()`).
    func handle(_ header: FuseRequestHeader, _ operation: FuseOperation, _ reply: FuseReply)
    /// The connection ended (unmounted): stop what serves it.
    func disconnected()
}

extension FuseFileSystem {
    public func disconnected() {}
}

public enum FuseSessionError: Error, CustomStringConvertible {
    case device(String)
    case protocolVersion(UInt32, UInt32)

    public var description: String {
        switch self {
        case .device(let m): return "FUSE device: \(m)"
        case .protocolVersion(let major, let minor):
            return "the kernel speaks FUSE \(major).\(minor); casfs needs 7.\(FuseABI.minMinor) or newer"
        }
    }
}

/// The request loop: reads requests from the device on several threads,
/// decodes them and lets the filesystem answer. Malformed requests get an
/// error reply; unknown opcodes ENOSYS. Ends when the kernel ends the
/// connection (unmount).
public final class FuseSession: @unchecked Sendable {
    public let channel: FuseChannel
    let fs: FuseFileSystem
    let threads: Int
    let trace: (@Sendable (String) -> Void)?
    let log: @Sendable (String) -> Void
    let bufferSize: Int
    private let exited = Atomic<Bool>(false)

    /// - Parameters:
    ///   - maxWrite: the largest WRITE the filesystem will ask for (sizes the buffers).
    ///   - trace: called with one line per request and reply (debugging).
    public init(fd: Int32, fileSystem: FuseFileSystem, threads: Int, maxWrite: Int = 1 << 20,
                log: @escaping @Sendable (String) -> Void, trace: (@Sendable (String) -> Void)? = nil) {
        self.channel = FuseChannel(fd: fd) { e in log("writing to the FUSE device failed: \(String(cString: strerror(e)))") }
        self.fs = fileSystem
        self.threads = max(1, threads)
        self.trace = trace
        self.log = log
        // A request is a header, its fixed arguments and at most maxWrite bytes.
        self.bufferSize = max(maxWrite + 4096, 8192 + 4096)
    }

    /// Serves until unmounted. Answers INIT on this thread, then reads on
    /// `threads` threads (this one included).
    public func run() throws {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 16)
        defer { buffer.deallocate() }
        let reply = FuseReply(channel: channel, capacity: bufferSize)
        try initialize(buffer, reply)
        var workers: [Thread] = []
        let done = DispatchGroup()
        for i in 1..<threads {
            done.enter()
            let t = Thread { [self] in
                let b = UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 16)
                defer { b.deallocate(); done.leave() }
                loop(b, FuseReply(channel: channel, capacity: bufferSize))
            }
            t.name = "casfs-fuse-\(i)"
            t.stackSize = 1 << 20
            workers.append(t)
            t.start()
        }
        loop(buffer, reply)
        done.wait()
        fs.disconnected()
    }

    /// Reads one request into `buffer`; nil when the connection is gone.
    private func receive(_ buffer: UnsafeMutableRawPointer) -> Int? {
        while !exited.load(ordering: .relaxed) {
            let n = read(channel.fd, buffer, bufferSize)
            if n > 0 { return n }
            let e = n < 0 ? errno : ENODEV
            switch e {
            case EINTR, EAGAIN, ENOENT: continue  // ENOENT: the request was interrupted before we read it
            case ENODEV:
                channel.markGone()
                exited.store(true, ordering: .relaxed)
                return nil
            default:
                log("reading the FUSE device failed: \(String(cString: strerror(e)))")
                exited.store(true, ordering: .relaxed)
                return nil
            }
        }
        return nil
    }

    private func initialize(_ buffer: UnsafeMutableRawPointer, _ reply: FuseReply) throws {
        while true {
            guard let n = receive(buffer) else { throw FuseSessionError.device("the connection ended before INIT") }
            let bytes = UnsafeRawBufferPointer(start: buffer, count: n)
            guard let h = try? FuseDecoder.header(bytes) else { continue }
            reply.begin(h)
            guard h.operation == .initialize, case .initialize(let offer)? = try? FuseDecoder.operation(h, bytes) else {
                reply.error(EIO)
                continue
            }
            if offer.major > FuseABI.kernelVersion {
                // A newer major: answer with ours; the kernel asks again.
                reply.put32(FuseABI.kernelVersion, FuseABI.outHeaderSize)
                reply.put32(FuseABI.maxMinor, FuseABI.outHeaderSize + 4)
                reply.zero(FuseABI.outHeaderSize + 8, FuseABI.initOutSize - 8)
                reply.send(payload: FuseABI.initOutSize)
                continue
            }
            guard offer.major == FuseABI.kernelVersion, offer.minor >= FuseABI.minMinor else {
                reply.error(EPROTO)
                throw FuseSessionError.protocolVersion(offer.major, offer.minor)
            }
            var want = fs.negotiate(offer)
            want.flags.formIntersection(offer.flags)
            if offer.flags.contains(.initExt) { want.flags.insert(.initExt) }
            let minor = min(offer.minor, FuseABI.maxMinor)
            let readahead = min(want.maxReadahead, offer.maxReadahead)
            let maxPages = UInt16(clamping: (Int(want.maxWrite) + 4095) / 4096)
            let o = FuseABI.outHeaderSize
            reply.zero(o, FuseABI.initOutSize)
            reply.put32(FuseABI.kernelVersion, o)
            reply.put32(minor, o + 4)
            reply.put32(readahead, o + 8)
            reply.put32(UInt32(truncatingIfNeeded: want.flags.rawValue), o + 12)
            reply.put16(want.maxBackground, o + 16)
            reply.put16(want.congestionThreshold, o + 18)
            reply.put32(want.maxWrite, o + 20)
            reply.put32(want.timeGranularity, o + 24)
            reply.put16(want.flags.contains(.maxPages) ? maxPages : 0, o + 28)
            reply.put32(UInt32(truncatingIfNeeded: want.flags.rawValue >> 32), o + 32)
            reply.put32(want.flags.contains(.passthrough) ? want.maxStackDepth : 0, o + 36)
            reply.send(payload: FuseABI.initOutSize)
            let info = FuseConnectionInfo(minor: minor, offered: offer.flags, flags: want.flags,
                                          maxWrite: want.maxWrite, maxReadahead: readahead)
            trace?("INIT 7.\(offer.minor) offered \(offer.flags), agreed 7.\(minor) \(want.flags)")
            fs.connected(info, channel)
            return
        }
    }

    private func loop(_ buffer: UnsafeMutableRawPointer, _ reply: FuseReply) {
        while let n = receive(buffer) {
            let bytes = UnsafeRawBufferPointer(start: buffer, count: n)
            let h: FuseRequestHeader
            do { h = try FuseDecoder.header(bytes) } catch {
                // Without a trustworthy header there is no one to answer.
                log("malformed FUSE request ignored: \(error)")
                continue
            }
            reply.begin(h)
            let op: FuseOperation
            do { op = try FuseDecoder.operation(h, bytes) } catch {
                log("malformed FUSE request \(h.operation?.name ?? String(h.opcode)) (unique \(h.unique)): \(error)")
                reply.error(EINVAL)
                continue
            }
            switch op {
            case .interrupt:
                // Requests finish on their own (every wait is bounded).
                continue
            case .destroy:
                reply.ok()
                exited.store(true, ordering: .relaxed)
                return
            case .initialize:
                reply.error(EIO)
                continue
            case .unsupported:
                reply.error(ENOSYS)
            default:
                fs.handle(h, op, reply)
                if reply.answered == nil {
                    log("no reply to \(h.operation?.name ?? String(h.opcode)) (unique \(h.unique)); answering EIO")
                    reply.error(EIO)
                }
            }
            if let trace {
                trace("\(h.unique) \(h.operation?.name ?? "op\(h.opcode)") node \(h.nodeid) pid \(h.pid) → \(reply.answered.map { $0 == 0 ? "ok" : "error \($0)" } ?? "-")")
            }
        }
    }
}
