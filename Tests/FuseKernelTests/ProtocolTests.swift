import Foundation
import FuseKernel
import FuseTestHarness
import Glibc
import Synchronization
import XCTest

/// A filesystem that answers LOOKUP with a fixed entry, counts what it gets,
/// and asks for every flag.
final class EchoFS: FuseFileSystem, @unchecked Sendable {
    let seen = Mutex<[UInt32]>([])
    var want: FuseInitFlags = [.asyncRead, .bigWrites, .maxPages, .passthrough, .doReaddirplus, .atomicOTrunc]
    func negotiate(_ offer: FuseInitIn) -> FuseInitReply {
        var r = FuseInitReply(flags: want, maxReadahead: 1 << 20, maxWrite: 1 << 20)
        r.maxStackDepth = 2
        return r
    }
    func connected(_ info: FuseConnectionInfo, _ channel: FuseChannel) {}
    func handle(_ h: FuseRequestHeader, _ op: FuseOperation, _ reply: FuseReply) {
        seen.withLock { $0.append(h.opcode) }
        switch op {
        case .lookup(let name):
            var a = FuseAttributes(ino: 7, mode: FuseFileType.regular.rawValue | 0o444)
            a.size = UInt64(name.bytes.count)
            reply.entry(FuseEntry(nodeid: 7, entryTimeout: 1.5, attrTimeout: 2, attributes: a))
        case .forget, .batchForget: reply.none()
        case .write(_, _, let data): reply.written(UInt32(data.count))
        default: reply.error(ENOSYS)
        }
    }
}

final class ProtocolTests: XCTestCase {
    func testInitNegotiatesWhatBothSidesHave() throws {
        let fs = EchoFS()
        let h = try FuseHarness(fs)
        defer { h.close() }
        let r = try XCTUnwrap(h.initialize())
        XCTAssertEqual(r.error, 0)
        let f = Fields(b: r.payload)
        XCTAssertEqual(r.payload.count, FuseABI.initOutSize)
        XCTAssertEqual(f.u32(0), 7)
        XCTAssertEqual(f.u32(4), 45)
        let flags = UInt64(f.u32(12)) | UInt64(f.u32(32)) << 32
        let agreed = FuseInitFlags(rawValue: flags)
        XCTAssertTrue(agreed.contains(.passthrough))
        XCTAssertTrue(agreed.contains(.initExt))
        XCTAssertTrue(agreed.contains(.maxPages))
        XCTAssertEqual(f.u32(20), 1 << 20, "max_write")
        XCTAssertEqual(f.u16(28), 256, "max_pages: 1 MiB requests")
        XCTAssertEqual(f.u32(36), 2, "max_stack_depth with passthrough")
        // After INIT, requests are answered.
        let e = try XCTUnwrap(h.send(.lookup, 1, FuseHarness.cstr("abc")))
        XCTAssertEqual(e.error, 0)
        XCTAssertEqual(Fields(b: e.payload).u64(0), 7)
        XCTAssertEqual(Fields(b: e.payload).u64(40 + 8), 3, "attr.size")
        XCTAssertEqual(Fields(b: e.payload).u64(16), 1, "entry_valid seconds")
        XCTAssertEqual(Fields(b: e.payload).u32(32), 500_000_000, "entry_valid_nsec")
    }

    func testInitWithAnOlderKernelAsksOnlyForWhatItOffers() throws {
        let h = try FuseHarness(EchoFS())
        defer { h.close() }
        // 7.32 (Linux 5.10): no INIT_EXT, so no flags2 and no passthrough.
        let r = try XCTUnwrap(h.initialize(minor: 32, flags: 0x0000_0000_03FF_FFFB))
        let f = Fields(b: r.payload)
        XCTAssertEqual(f.u32(4), 32)
        XCTAssertEqual(f.u32(32), 0, "no flags2 without INIT_EXT")
        XCTAssertFalse(FuseInitFlags(rawValue: UInt64(f.u32(12))).contains(.initExt))
        XCTAssertEqual(f.u32(36), 0, "no stack depth without passthrough")
    }

    func testTooOldKernelIsRefused() throws {
        let h = try FuseHarness(EchoFS())
        let r = try XCTUnwrap(h.initialize(minor: 20, flags: 0xFF))
        XCTAssertEqual(r.error, EPROTO)
        XCTAssertEqual(h.done.wait(timeout: .now() + 10), .success, "the session ends")
        h.done.signal()
        h.close()
    }

    func testUnknownAndUnsupportedOpcodesAreENOSYS() throws {
        let h = try FuseHarness(EchoFS())
        defer { h.close() }
        _ = h.initialize()
        // Opcode 99 does not exist; BMAP (37) is not decoded.
        let unknown = h.raw(FuseHarness.header(.lookup, unique: 100, nodeid: 1, bodyLength: 0).enumerated().map { i, b in
            i == 4 ? 99 : (i >= 5 && i < 8 ? 0 : b)
        })
        XCTAssertEqual(unknown?.error, ENOSYS)
        XCTAssertEqual(h.send(.bmap, 1, [UInt8](repeating: 0, count: 16))?.error, ENOSYS)
    }

    func testMalformedRequestsGetErrorsAndTheSessionKeepsServing() throws {
        let fs = EchoFS()
        let h = try FuseHarness(fs)
        defer { h.close() }
        _ = h.initialize()
        // A name without its NUL.
        XCTAssertEqual(h.send(.lookup, 1, Array("abc".utf8))?.error, EINVAL)
        // WRITE announcing more data than sent.
        var w = FuseHarness.le(UInt64(1)) + FuseHarness.le(UInt64(0)) + FuseHarness.le(UInt32(100)) + [UInt8](repeating: 0, count: 20)
        w += [1, 2, 3]
        XCTAssertEqual(h.send(.write, 7, w)?.error, EINVAL)
        // BATCH_FORGET claiming 2^32-1 entries.
        XCTAssertEqual(h.send(.batchForget, 0, FuseHarness.le(UInt32.max) + FuseHarness.le(UInt32(0)))?.error, EINVAL)
        // Short fixed arguments.
        XCTAssertEqual(h.send(.read, 7, [1, 2])?.error, EINVAL)
        XCTAssertEqual(h.send(.setattr, 7, [UInt8](repeating: 0, count: 10))?.error, EINVAL)
        // A header whose length lies: not answered (no trustworthy request), and the next one is.
        var bad = FuseHarness.header(.lookup, unique: 500, nodeid: 1, bodyLength: 100) + FuseHarness.cstr("x")
        bad[0] = 0xff
        XCTAssertNil(h.raw(bad, expectReply: false))
        XCTAssertEqual(h.send(.lookup, 1, FuseHarness.cstr("still"))?.error, 0)
        // FORGET and INTERRUPT are not answered; the next request is.
        h.send(.forget, 7, FuseHarness.le(UInt64(1)), expectReply: false)
        h.send(.interrupt, 0, FuseHarness.le(UInt64(12)), expectReply: false)
        XCTAssertEqual(h.send(.lookup, 1, FuseHarness.cstr("after"))?.error, 0)
        XCTAssertFalse(h.errors.all.isEmpty, "malformed requests are logged")
    }

    func testRandomBytesNeverStopTheSession() throws {
        let h = try FuseHarness(EchoFS())
        defer { h.close() }
        _ = h.initialize()
        var rng = SystemRandomNumberGenerator()
        for i in 0..<2000 {
            let op = FuseOpcode.allDecoded.randomElement(using: &rng)!
            let len = Int.random(in: 0...80, using: &rng)
            let body = (0..<len).map { _ in UInt8.random(in: 0...255, using: &rng) }
            // Answered or not, it must not hang or crash the loop.
            _ = h.raw(FuseHarness.header(op, unique: UInt64(1000 + 2 * i), nodeid: 1, bodyLength: body.count) + body,
                      expectReply: false)
            if i % 100 == 0 {
                // Drain what came back so the socket never fills.
                while h.receive(timeout: 50) != nil {}
            }
        }
        while h.receive(timeout: 200) != nil {}
        XCTAssertEqual(h.send(.lookup, 1, FuseHarness.cstr("alive"))?.error, 0)
    }

    func testDirectoryFillerStopsWhenFull() throws {
        // Entries are 8-byte aligned and never exceed the size asked for.
        final class Lister: FuseFileSystem, @unchecked Sendable {
            func negotiate(_ offer: FuseInitIn) -> FuseInitReply { FuseInitReply(flags: [], maxReadahead: 0, maxWrite: 1 << 20) }
            func connected(_ info: FuseConnectionInfo, _ channel: FuseChannel) {}
            func handle(_ h: FuseRequestHeader, _ op: FuseOperation, _ reply: FuseReply) {
                guard case .readdir(_, _, let size, _) = op else { return reply.error(ENOSYS) }
                reply.directory(size: Int(size)) { filler in
                    for i in 0..<100 {
                        let ok = Array("name-\(i)".utf8).withUnsafeBytes {
                            filler.add(name: $0, ino: UInt64(i + 10), type: .regular, nextOffset: UInt64(i + 1))
                        }
                        if !ok { break }
                    }
                    return 0
                }
            }
        }
        let h = try FuseHarness(Lister())
        defer { h.close() }
        _ = h.initialize()
        let body = FuseHarness.le(UInt64(0)) + FuseHarness.le(UInt64(0)) + FuseHarness.le(UInt32(100)) + [UInt8](repeating: 0, count: 20)
        let r = try XCTUnwrap(h.send(.readdir, 1, body))
        XCTAssertLessThanOrEqual(r.payload.count, 100)
        XCTAssertEqual(r.payload.count % 8, 0)
        XCTAssertEqual(r.payload.count, 3 * 32, "three 32-byte entries fit in 100 bytes")
        XCTAssertEqual(Fields(b: r.payload).u64(0), 10)
        XCTAssertEqual(Fields(b: r.payload).u32(16), 6, "namelen")
    }
}

extension FuseOpcode {
    static let allDecoded: [FuseOpcode] = [
        .lookup, .forget, .getattr, .setattr, .readlink, .symlink, .mknod, .mkdir, .unlink, .rmdir, .rename, .link,
        .open, .read, .write, .statfs, .release, .fsync, .setxattr, .getxattr, .listxattr, .removexattr, .flush,
        .opendir, .readdir, .releasedir, .fsyncdir, .access, .create, .batchForget, .readdirplus, .rename2, .lseek,
        .fallocate,
    ]
}
