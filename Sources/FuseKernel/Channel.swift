import CLinux
import Glibc
import Synchronization

/// The connection to the kernel: the `/dev/fuse` descriptor. Replies,
/// notifications and backing-file registration all go through it.
public final class FuseChannel: Sendable {
    public let fd: Int32
    private let gone = Atomic<Bool>(false)
    /// Reports a failed write to the device (other than "the request is gone").
    let onWriteError: @Sendable (Int32) -> Void

    public init(fd: Int32, onWriteError: @escaping @Sendable (Int32) -> Void = { _ in }) {
        self.fd = fd
        self.onWriteError = onWriteError
    }

    /// True once the kernel ended the connection (unmounted).
    public var isGone: Bool { gone.load(ordering: .relaxed) }
    func markGone() { gone.store(true, ordering: .relaxed) }

    /// Writes one message. ENOENT means the kernel no longer waits for this
    /// reply (the request was interrupted): not an error.
    @discardableResult
    func send(_ p: UnsafeRawPointer, _ n: Int) -> Int32 {
        while true {
            let r = Glibc.write(fd, p, n)
            if r == n { return 0 }
            let e = r < 0 ? errno : EIO
            if e == EINTR { continue }
            if e == ENOENT { return e }
            if e == ENODEV { markGone(); return e }
            onWriteError(e)
            return e
        }
    }

    // MARK: notifications

    /// Drops the kernel's cached pages (and attributes) of an inode. Never
    /// call it from the handler of a request on that inode before replying:
    /// the kernel may wait on that very request.
    @discardableResult
    public func invalidateInode(_ ino: UInt64, offset: Int64 = 0, length: Int64 = 0) -> Int32 {
        var msg = [UInt8](repeating: 0, count: FuseABI.outHeaderSize + 24)
        msg.withUnsafeMutableBytes { b in
            header(b, length: b.count, code: .invalInode)
            b.storeBytes(of: ino.littleEndian, toByteOffset: 16, as: UInt64.self)
            b.storeBytes(of: offset.littleEndian, toByteOffset: 24, as: Int64.self)
            b.storeBytes(of: length.littleEndian, toByteOffset: 32, as: Int64.self)
        }
        return msg.withUnsafeBytes { send($0.baseAddress!, $0.count) }
    }

    /// Drops the kernel's cached entry `name` in directory `parent`.
    @discardableResult
    public func invalidateEntry(parent: UInt64, name: [UInt8]) -> Int32 {
        var msg = [UInt8](repeating: 0, count: FuseABI.outHeaderSize + 16 + name.count + 1)
        msg.withUnsafeMutableBytes { b in
            header(b, length: b.count, code: .invalEntry)
            b.storeBytes(of: parent.littleEndian, toByteOffset: 16, as: UInt64.self)
            b.storeBytes(of: UInt32(name.count).littleEndian, toByteOffset: 24, as: UInt32.self)
            b.storeBytes(of: UInt32(0), toByteOffset: 28, as: UInt32.self)
            for (i, c) in name.enumerated() { b[32 + i] = c }
        }
        return msg.withUnsafeBytes { send($0.baseAddress!, $0.count) }
    }

    /// Puts `data` into the kernel's page cache of inode `ino` at `offset`
    /// (FUSE_NOTIFY_STORE), so reads of it never reach the daemon. Returns
    /// 0, or the errno: ENOENT when the kernel does not (yet) hold the inode.
    /// Never call it from the handler of a request on that inode: the
    /// kernel may hold a page of it locked, waiting on that very request.
    @discardableResult
    public func store(_ ino: UInt64, offset: UInt64 = 0, _ data: UnsafeRawBufferPointer) -> Int32 {
        guard data.count <= Int(UInt32.max) - 64 else { return EINVAL }
        var head = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        let length = FuseABI.outHeaderSize + 24 + data.count
        withUnsafeMutableBytes(of: &head) { b in
            header(b, length: length, code: .store)
            b.storeBytes(of: ino.littleEndian, toByteOffset: 16, as: UInt64.self)
            b.storeBytes(of: offset.littleEndian, toByteOffset: 24, as: UInt64.self)
            b.storeBytes(of: UInt32(data.count).littleEndian, toByteOffset: 32, as: UInt32.self)
            b.storeBytes(of: UInt32(0), toByteOffset: 36, as: UInt32.self)
        }
        return withUnsafeBytes(of: &head) { h in
            var iov = [iovec(iov_base: UnsafeMutableRawPointer(mutating: h.baseAddress), iov_len: 40),
                       iovec(iov_base: UnsafeMutableRawPointer(mutating: data.baseAddress), iov_len: data.count)]
            while true {
                let r = writev(fd, &iov, data.count > 0 ? 2 : 1)
                if r == length { return 0 }
                let e = r < 0 ? errno : EIO
                if e == EINTR { continue }
                if e == ENODEV { markGone() }
                // ENOENT: the inode is not (or no longer) in the kernel's
                // cache: nothing to store into, not a failure of the device.
                if e != ENOENT && e != ENODEV { onWriteError(e) }
                return e
            }
        }
    }

    private func header(_ b: UnsafeMutableRawBufferPointer, length: Int, code: FuseNotifyCode) {
        b.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 0, as: UInt32.self)
        b.storeBytes(of: code.rawValue.littleEndian, toByteOffset: 4, as: Int32.self)
        b.storeBytes(of: UInt64(0), toByteOffset: 8, as: UInt64.self)
    }

    // MARK: passthrough

    /// Registers `file` (an open descriptor) as a backing file; returns its
    /// backing id, or the errno (EPERM without CAP_SYS_ADMIN).
    public func openBacking(_ file: Int32) -> Result<Int32, FuseErrno> {
        var map = [UInt8](repeating: 0, count: 16)
        map.withUnsafeMutableBytes { $0.storeBytes(of: file.littleEndian, toByteOffset: 0, as: Int32.self) }
        let r = map.withUnsafeMutableBytes { casfs_ioctl(fd, FuseDeviceIoctl.backingOpen, $0.baseAddress) }
        return r > 0 ? .success(r) : .failure(FuseErrno(r < 0 ? errno : EIO))
    }

    /// Releases a backing id (the kernel keeps the file while it is open).
    public func closeBacking(_ id: Int32) {
        var v = UInt32(bitPattern: id)
        _ = casfs_ioctl(fd, FuseDeviceIoctl.backingClose, &v)
    }
}

public struct FuseErrno: Error, Equatable, Sendable, CustomStringConvertible {
    public let code: Int32
    public init(_ code: Int32) { self.code = code }
    public var description: String { String(cString: strerror(code)) }
}
