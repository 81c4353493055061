import Glibc

/// Builds the reply to one request in a buffer owned by the worker thread
/// (reused for every request it serves: no allocation per reply) and writes
/// it to the device in one `write`.
public final class FuseReply: @unchecked Sendable {
    public let channel: FuseChannel
    let capacity: Int
    let buffer: UnsafeMutableRawPointer
    public private(set) var unique: UInt64 = 0
    public private(set) var opcode: UInt32 = 0
    /// The errno the request was answered with (0 for success), once answered.
    public private(set) var answered: Int32?
    /// The kernel took the reply (false when the request was interrupted and
    /// is gone: what the reply handed over, an inode or a handle, was not taken).
    public private(set) var delivered = false

    /// `capacity` must hold the largest reply: a READ of `max_read` bytes
    /// plus the header.
    public init(channel: FuseChannel, capacity: Int) {
        self.channel = channel
        self.capacity = max(capacity, 8192)
        self.buffer = UnsafeMutableRawPointer.allocate(byteCount: self.capacity, alignment: 16)
    }

    deinit { buffer.deallocate() }

    /// Starts a new request (done by the session before the handler runs).
    func begin(_ h: FuseRequestHeader) {
        unique = h.unique
        opcode = h.opcode
        answered = nil
        delivered = false
    }

    // MARK: raw encoding

    @inline(__always) func put32(_ v: UInt32, _ at: Int) { buffer.storeBytes(of: v.littleEndian, toByteOffset: at, as: UInt32.self) }
    @inline(__always) func put64(_ v: UInt64, _ at: Int) { buffer.storeBytes(of: v.littleEndian, toByteOffset: at, as: UInt64.self) }
    @inline(__always) func put16(_ v: UInt16, _ at: Int) { buffer.storeBytes(of: v.littleEndian, toByteOffset: at, as: UInt16.self) }

    func zero(_ at: Int, _ n: Int) { memset(buffer + at, 0, n) }

    func encodeAttributes(_ a: FuseAttributes, at o: Int) {
        put64(a.ino, o); put64(a.size, o + 8); put64(a.blocks, o + 16)
        put64(a.atime.seconds, o + 24); put64(a.mtime.seconds, o + 32); put64(a.ctime.seconds, o + 40)
        put32(a.atime.nanoseconds, o + 48); put32(a.mtime.nanoseconds, o + 52); put32(a.ctime.nanoseconds, o + 56)
        put32(a.mode, o + 60); put32(a.nlink, o + 64); put32(a.uid, o + 68); put32(a.gid, o + 72)
        put32(0, o + 76); put32(a.blksize, o + 80); put32(0, o + 84)
    }

    func encodeEntry(_ e: FuseEntry, at o: Int) {
        put64(e.nodeid, o); put64(e.generation, o + 8)
        put64(e.entryTimeout.seconds, o + 16); put64(e.attrTimeout.seconds, o + 24)
        put32(e.entryTimeout.nanoseconds, o + 32); put32(e.attrTimeout.nanoseconds, o + 36)
        encodeAttributes(e.attributes, at: o + 40)
    }

    func encodeOpen(fh: UInt64, flags: FuseOpenFlags, backingID: Int32, at o: Int) {
        put64(fh, o); put32(flags.rawValue, o + 8); put32(UInt32(bitPattern: backingID), o + 12)
    }

    /// Writes the header for `payload` bytes and sends header + payload.
    func send(payload: Int, error: Int32 = 0) {
        let total = FuseABI.outHeaderSize + payload
        put32(UInt32(total), 0)
        put32(UInt32(bitPattern: -error), 4)
        put64(unique, 8)
        answered = error
        delivered = channel.send(buffer, total) == 0
    }

    // MARK: replies

    public func error(_ errno: Int32) {
        send(payload: 0, error: errno == 0 ? 0 : abs(errno))
    }

    public func ok() { send(payload: 0) }

    /// FORGET and friends are not answered; this marks them handled.
    public func none() {
        answered = 0
        delivered = true
    }

    public func entry(_ e: FuseEntry) {
        encodeEntry(e, at: FuseABI.outHeaderSize)
        send(payload: FuseABI.entryOutSize)
    }

    public func create(_ e: FuseEntry, fh: UInt64, flags: FuseOpenFlags, backingID: Int32 = 0) {
        encodeEntry(e, at: FuseABI.outHeaderSize)
        encodeOpen(fh: fh, flags: flags, backingID: backingID, at: FuseABI.outHeaderSize + FuseABI.entryOutSize)
        send(payload: FuseABI.entryOutSize + FuseABI.openOutSize)
    }

    public func attributes(_ a: FuseAttributes, timeout: Double) {
        let t = FuseTime(timeout: timeout)
        let o = FuseABI.outHeaderSize
        put64(t.seconds, o); put32(t.nanoseconds, o + 8); put32(0, o + 12)
        encodeAttributes(a, at: o + 16)
        send(payload: FuseABI.attrOutSize)
    }

    public func open(fh: UInt64, flags: FuseOpenFlags, backingID: Int32 = 0) {
        encodeOpen(fh: fh, flags: flags, backingID: backingID, at: FuseABI.outHeaderSize)
        send(payload: FuseABI.openOutSize)
    }

    public func written(_ count: UInt32) {
        put32(count, FuseABI.outHeaderSize); put32(0, FuseABI.outHeaderSize + 4)
        send(payload: FuseABI.writeOutSize)
    }

    public func statfs(_ s: FuseStatfs) {
        let o = FuseABI.outHeaderSize
        put64(s.blocks, o); put64(s.blocksFree, o + 8); put64(s.blocksAvailable, o + 16)
        put64(s.files, o + 24); put64(s.filesFree, o + 32)
        put32(s.blockSize, o + 40); put32(s.nameLength, o + 44); put32(s.fragmentSize, o + 48)
        zero(o + 52, 28)
        send(payload: FuseABI.statfsOutSize)
    }

    public func xattrSize(_ n: Int) {
        put32(UInt32(clamping: n), FuseABI.outHeaderSize); put32(0, FuseABI.outHeaderSize + 4)
        send(payload: FuseABI.xattrOutSize)
    }

    public func lseek(_ offset: UInt64) {
        put64(offset, FuseABI.outHeaderSize)
        send(payload: FuseABI.lseekOutSize)
    }

    /// A reply of raw bytes (readlink, getxattr, listxattr, small reads).
    public func bytes(_ b: UnsafeRawBufferPointer) {
        let n = min(b.count, capacity - FuseABI.outHeaderSize)
        if n > 0 { memcpy(buffer + FuseABI.outHeaderSize, b.baseAddress!, n) }
        send(payload: n)
    }

    public func bytes(_ b: [UInt8]) { b.withUnsafeBytes { bytes($0) } }

    /// The room a data reply can fill.
    public var dataCapacity: Int { capacity - FuseABI.outHeaderSize }

    /// A READ reply filled in place: `fill` writes up to `count` bytes into
    /// the reply buffer and returns how many (no intermediate copy).
    public func data(count: Int, _ fill: (UnsafeMutableRawBufferPointer) throws -> Int) rethrows {
        let n = max(0, min(count, dataCapacity))
        let got = try fill(UnsafeMutableRawBufferPointer(start: buffer + FuseABI.outHeaderSize, count: n))
        send(payload: max(0, min(got, n)))
    }

    // MARK: directory listings

    /// Fills a READDIR(PLUS) reply of at most `size` bytes. `fill` returns
    /// 0, or an errno that is the answer when it added no entry (an empty
    /// reply would mean the end of the directory).
    public func directory(size: Int, _ fill: (inout DirectoryFiller) -> Int32) {
        var filler = DirectoryFiller(reply: self, limit: min(max(0, size), dataCapacity))
        let rc = fill(&filler)
        if rc != 0 && filler.isEmpty { return error(rc) }
        send(payload: filler.used)
    }
}

/// Appends directory entries to a READDIR(PLUS) reply until it is full.
public struct DirectoryFiller {
    let reply: FuseReply
    let limit: Int
    public private(set) var used = 0

    init(reply: FuseReply, limit: Int) {
        self.reply = reply
        self.limit = limit
    }

    /// A READDIR entry. False (nothing added) when it does not fit.
    public mutating func add(name: UnsafeRawBufferPointer, ino: UInt64, type: FuseFileType, nextOffset: UInt64) -> Bool {
        let size = (FuseABI.direntHeaderSize + name.count + 7) & ~7
        guard used + size <= limit, name.count <= 1024 else { return false }
        let o = FuseABI.outHeaderSize + used
        writeDirent(at: o, name: name, ino: ino, type: type, nextOffset: nextOffset, size: size)
        used += size
        return true
    }

    /// A READDIRPLUS entry (an entry the kernel counts as looked up unless
    /// its nodeid is 0). False when it does not fit.
    public mutating func add(name: UnsafeRawBufferPointer, entry: FuseEntry, type: FuseFileType, nextOffset: UInt64) -> Bool {
        let size = (FuseABI.entryOutSize + FuseABI.direntHeaderSize + name.count + 7) & ~7
        guard used + size <= limit, name.count <= 1024 else { return false }
        let o = FuseABI.outHeaderSize + used
        reply.encodeEntry(entry, at: o)
        writeDirent(at: o + FuseABI.entryOutSize, name: name, ino: entry.attributes.ino, type: type,
                    nextOffset: nextOffset, size: size - FuseABI.entryOutSize)
        used += size
        return true
    }

    private func writeDirent(at o: Int, name: UnsafeRawBufferPointer, ino: UInt64, type: FuseFileType, nextOffset: UInt64, size: Int) {
        reply.put64(ino, o)
        reply.put64(nextOffset, o + 8)
        reply.put32(UInt32(name.count), o + 16)
        reply.put32(type.direntType, o + 20)
        if name.count > 0 { memcpy(reply.buffer + o + 24, name.baseAddress!, name.count) }
        let pad = size - FuseABI.direntHeaderSize - name.count
        if pad > 0 { memset(reply.buffer + o + 24 + name.count, 0, pad) }
    }

    public var isEmpty: Bool { used == 0 }
}
