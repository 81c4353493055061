import Foundation
import FuseKernel
import Glibc

/// A FUSE session over a SEQPACKET socket pair standing in for /dev/fuse
/// (one message per read, as the device gives): tests write encoded
/// requests and read the replies, no kernel involved. Replies decode into
/// typed values (`Reply.entry()`, `.attributes()`, `.open()`, `.dirents()`,
/// ...); notifications the filesystem writes arrive as `Notification`s.
public final class FuseHarness {
    public let kernel: Int32
    public let daemon: Int32
    public let session: FuseSession
    private let thread: Thread
    private var unique: UInt64 = 10
    public let done = DispatchSemaphore(value: 0)
    public let errors = LogLines()
    /// Notifications (unique 0) read while waiting for replies, in order.
    public private(set) var notifications: [Notification] = []

    public final class LogLines: @unchecked Sendable {
        private let lock = NSLock()
        private var lines: [String] = []
        func add(_ s: String) { lock.withLock { lines.append(s) } }
        public var all: [String] { lock.withLock { lines } }
    }

    public init(_ fs: FuseFileSystem, threads: Int = 1) throws {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw NSError(domain: "socketpair", code: Int(errno))
        }
        kernel = fds[0]
        daemon = fds[1]
        let errors = self.errors
        session = FuseSession(fd: daemon, fileSystem: fs, threads: threads, maxWrite: 1 << 20,
                              log: { errors.add($0) })
        let s = session
        let done = self.done
        thread = Thread {
            try? s.run()
            done.signal()
        }
        thread.start()
    }

    private var closed = false

    /// Ends the session as an unmount does (the device reads 0).
    public func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(kernel)
        _ = done.wait(timeout: .now() + 10)
        Glibc.close(daemon)
    }

    deinit { close() }

    // MARK: encoding requests

    public static func header(_ opcode: FuseOpcode, unique: UInt64, nodeid: UInt64, bodyLength: Int,
                              pid: UInt32 = UInt32(getpid())) -> [UInt8] {
        var b = [UInt8]()
        b += le(UInt32(FuseABI.inHeaderSize + bodyLength))
        b += le(opcode.rawValue)
        b += le(unique)
        b += le(nodeid)
        b += le(UInt32(0)) + le(UInt32(0)) + le(pid) + le(UInt32(0))
        return b
    }

    public static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    public static func cstr(_ s: String) -> [UInt8] { Array(s.utf8) + [0] }

    /// Sends a raw message; returns the reply, or nil for no reply.
    @discardableResult
    public func raw(_ bytes: [UInt8], expectReply: Bool = true) -> Reply? {
        let n = bytes.withUnsafeBytes { Glibc.write(kernel, $0.baseAddress, $0.count) }
        guard n == bytes.count else {
            errors.add("harness: wrote \(n) of \(bytes.count) bytes")
            return nil
        }
        guard expectReply else { return nil }
        return receive()
    }

    /// The next reply (notifications read meanwhile are kept in `notifications`).
    public func receive(timeout: Int32 = 10_000) -> Reply? {
        while let m = receiveMessage(timeout: timeout) {
            if m.unique == 0 {
                notifications.append(Notification(code: -m.error, payload: m.payload))
                continue
            }
            return m
        }
        return nil
    }

    /// The next message of any kind (a reply or a notification).
    public func receiveMessage(timeout: Int32 = 10_000) -> Reply? {
        var pfd = pollfd(fd: kernel, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, timeout) == 1 else { return nil }
        var buf = [UInt8](repeating: 0, count: (1 << 20) + 4096)
        let n = Glibc.read(kernel, &buf, buf.count)
        guard n >= FuseABI.outHeaderSize else { return nil }
        let f = Fields(b: buf)
        if Int(f.u32(0)) != n { errors.add("harness: reply length field \(f.u32(0)) but \(n) bytes") }
        let err = Int32(bitPattern: f.u32(4))
        return Reply(error: -err, payload: Array(buf[FuseABI.outHeaderSize..<n]), unique: f.u64(8))
    }

    /// Waits up to `timeout` ms for notifications; returns those received so far.
    public func waitForNotifications(count: Int, timeout: Int32 = 5_000) -> [Notification] {
        let deadline = Date().addingTimeInterval(Double(timeout) / 1000)
        while notifications.count < count, Date() < deadline {
            guard let m = receiveMessage(timeout: 50) else { continue }
            if m.unique == 0 { notifications.append(Notification(code: -m.error, payload: m.payload)) }
        }
        return notifications
    }

    /// Sends a request with `body`; returns the reply.
    @discardableResult
    public func send(_ opcode: FuseOpcode, _ nodeid: UInt64 = FuseABI.rootID, _ body: [UInt8] = [],
                     pid: UInt32 = UInt32(getpid()), expectReply: Bool = true) -> Reply? {
        unique += 2
        return raw(Self.header(opcode, unique: unique, nodeid: nodeid, bodyLength: body.count, pid: pid) + body,
                   expectReply: expectReply)
    }

    /// INIT as a kernel speaking 7.45 with every flag offers it.
    public func initialize(minor: UInt32 = 45, flags: UInt64 = 0x0000_05FD_73FF_FFFB) -> Reply? {
        var body = Self.le(UInt32(7)) + Self.le(minor) + Self.le(UInt32(1 << 20)) + Self.le(UInt32(truncatingIfNeeded: flags))
        body += Self.le(UInt32(truncatingIfNeeded: flags >> 32)) + [UInt8](repeating: 0, count: 44)
        return send(.initialize, 0, body)
    }
}

/// One message from the daemon: a reply (its errno, 0 for success, and
/// payload) or, with `unique` 0, a notification.
public struct Reply: Sendable {
    public let error: Int32
    public let payload: [UInt8]
    public var unique: UInt64 = 1

    public init(error: Int32, payload: [UInt8], unique: UInt64 = 1) {
        self.error = error
        self.payload = payload
        self.unique = unique
    }
}

/// A notification the daemon wrote (`code` is the FUSE_NOTIFY_* number).
public struct Notification: Sendable {
    public let code: Int32
    public let payload: [UInt8]

    /// FUSE_NOTIFY_STORE's node, offset and data.
    public var store: (nodeid: UInt64, offset: UInt64, data: [UInt8])? {
        guard code == 4, payload.count >= 24 else { return nil }
        let f = Fields(b: payload)
        let size = Int(f.u32(16))
        guard payload.count >= 24 + size else { return nil }
        return (f.u64(0), f.u64(8), Array(payload[24..<(24 + size)]))
    }
}

/// Reads little-endian fields out of a reply payload.
public struct Fields {
    public let b: [UInt8]
    public init(b: [UInt8]) { self.b = b }
    public func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[at + $1]) << (8 * $1) } }
    public func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[at + $1]) << (8 * $1) } }
    public func u16(_ at: Int) -> UInt16 { UInt16(b[at]) | UInt16(b[at + 1]) << 8 }
}
