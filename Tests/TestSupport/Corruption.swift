import CASCore
import Foundation

/// Flips every bit of the byte at `offset` of the file at `path`, in place
/// (same length, new modification time): damage done behind casfs's back.
public func flipByte(path: String, at offset: Int64) throws {
    let fd = open(path, O_RDWR | O_CLOEXEC)
    guard fd >= 0 else { throw TestSupportError("open \(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    var b: UInt8 = 0
    guard pread(fd, &b, 1, off_t(offset)) == 1 else {
        throw TestSupportError("read byte \(offset) of \(path): \(String(cString: strerror(errno)))")
    }
    b ^= 0xFF
    guard pwrite(fd, &b, 1, off_t(offset)) == 1 else {
        throw TestSupportError("write byte \(offset) of \(path): \(String(cString: strerror(errno)))")
    }
    guard fsync(fd) == 0 else { throw TestSupportError("fsync \(path): \(String(cString: strerror(errno)))") }
}

/// A file of `size` random bytes made by the shell (large blobs are not held
/// in the test's memory), and its digest.
public func randomFile(_ path: String, size: Int64) throws -> Digest {
    let dir = (path as NSString).deletingLastPathComponent
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    let r = runShell("head -c \(size) /dev/urandom > \(shq(path)) && sha256sum < \(shq(path)) | cut -c1-64")
    guard r.ok else { throw TestSupportError("making \(path): \(r)") }
    return try Digest(hash: r.stdout.trimmingCharacters(in: .whitespacesAndNewlines), size: size)
}

/// The SHA-256 (hex) of a file, or of `count` bytes of it from `offset`.
public func sha256OfFile(_ path: String, offset: Int64 = 0, count: Int64? = nil) throws -> String {
    let cmd: String
    if let count {
        cmd = "tail -c +\(offset + 1) \(shq(path)) | head -c \(count) | sha256sum | cut -c1-64"
    } else {
        cmd = "sha256sum < \(shq(path)) | cut -c1-64"
    }
    let r = runShell(cmd)
    guard r.ok else { throw TestSupportError("hashing \(path): \(r)") }
    return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
}
