import Foundation
import FuseKernel
import Glibc
import XCTest

/// A FUSE session over a SEQPACKET socket pair standing in for /dev/fuse
/// (one message per read, as the device gives): tests write encoded
/// requests and read the replies, no kernel involved.
final class FuseHarness {
    let kernel: Int32
    let daemon: Int32
    let session: FuseSession
    private let thread: Thread
    private var unique: UInt64 = 10
    let done = DispatchSemaphore(value: 0)
    let errors = LogLines()

    final class LogLines: @unchecked Sendable {
        private let lock = NSLock()
        private var lines: [String] = []
        func add(_ s: String) { lock.withLock { lines.append(s) } }
        var all: [String] { lock.withLock { lines } }
    }

    init(_ fs: FuseFileSystem, threads: Int = 1) throws {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &fds) == 0 else {
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
    func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(kernel)
        _ = done.wait(timeout: .now() + 10)
        Glibc.close(daemon)
    }

    deinit { close() }

    // MARK: encoding requests

    static func header(_ opcode: FuseOpcode, unique: UInt64, nodeid: UInt64, bodyLength: Int, pid: UInt32 = UInt32(getpid())) -> [UInt8] {
        var b = [UInt8]()
        b += le(UInt32(FuseABI.inHeaderSize + bodyLength))
        b += le(opcode.rawValue)
        b += le(unique)
        b += le(nodeid)
        b += le(UInt32(0)) + le(UInt32(0)) + le(pid) + le(UInt32(0))
        return b
    }

    static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func cstr(_ s: String) -> [UInt8] { Array(s.utf8) + [0] }

    /// Sends a raw message; returns the reply (error, payload), or nil for no reply.
    @discardableResult
    func raw(_ bytes: [UInt8], expectReply: Bool = true) -> (error: Int32, payload: [UInt8])? {
        let n = bytes.withUnsafeBytes { Glibc.write(kernel, $0.baseAddress, $0.count) }
        XCTAssertEqual(n, bytes.count)
        guard expectReply else { return nil }
        return receive()
    }

    func receive(timeout: Int32 = 10_000) -> (error: Int32, payload: [UInt8])? {
        var pfd = pollfd(fd: kernel, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, timeout) == 1 else { return nil }
        var buf = [UInt8](repeating: 0, count: (1 << 20) + 4096)
        let n = read(kernel, &buf, buf.count)
        guard n >= FuseABI.outHeaderSize else { return nil }
        let len = Int(UInt32(buf[0]) | UInt32(buf[1]) << 8 | UInt32(buf[2]) << 16 | UInt32(buf[3]) << 24)
        XCTAssertEqual(len, n, "the reply's length field matches its size")
        let err = Int32(bitPattern: UInt32(buf[4]) | UInt32(buf[5]) << 8 | UInt32(buf[6]) << 16 | UInt32(buf[7]) << 24)
        return (-err, Array(buf[FuseABI.outHeaderSize..<n]))
    }

    /// Sends a request with `body`; returns (errno, payload).
    @discardableResult
    func send(_ opcode: FuseOpcode, _ nodeid: UInt64 = FuseABI.rootID, _ body: [UInt8] = [], pid: UInt32 = UInt32(getpid()),
              expectReply: Bool = true) -> (error: Int32, payload: [UInt8])? {
        unique += 2
        return raw(Self.header(opcode, unique: unique, nodeid: nodeid, bodyLength: body.count, pid: pid) + body,
                   expectReply: expectReply)
    }

    /// INIT as a kernel speaking 7.45 with every flag offers it.
    func initialize(minor: UInt32 = 45, flags: UInt64 = 0x0000_05FD_73FF_FFFB) -> (error: Int32, payload: [UInt8])? {
        var body = Self.le(UInt32(7)) + Self.le(minor) + Self.le(UInt32(1 << 20)) + Self.le(UInt32(truncatingIfNeeded: flags))
        body += Self.le(UInt32(truncatingIfNeeded: flags >> 32)) + [UInt8](repeating: 0, count: 44)
        return send(.initialize, 0, body)
    }
}

/// Reads little-endian fields out of a reply payload.
struct Fields {
    let b: [UInt8]
    func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[at + $1]) << (8 * $1) } }
    func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[at + $1]) << (8 * $1) } }
    func u16(_ at: Int) -> UInt16 { UInt16(b[at]) | UInt16(b[at + 1]) << 8 }
}
