import Crypto
import Foundation

/// A REAPI SHA-256 digest: the hash and the blob's length. The size is part of
/// the identity: the same hash with another size names a different (absent) blob.
public struct Digest: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// 64 lowercase hexadecimal digits.
    public let hash: String
    /// Length of the blob in bytes.
    public let size: Int64

    /// The empty blob, which exists in every store without being written.
    public static let empty = Digest(
        uncheckedHash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", size: 0)

    public var isEmpty: Bool { size == 0 && hash == Digest.empty.hash }

    /// Creates a digest from its parts, validating both.
    public init(hash: String, size: Int64) throws {
        guard Digest.isValidHash(hash) else { throw StorageError.invalidDigest("bad hash '\(hash)'") }
        guard size >= 0 else { throw StorageError.invalidDigest("negative size \(size)") }
        self.hash = hash
        self.size = size
    }

    init(uncheckedHash: String, size: Int64) {
        self.hash = uncheckedHash
        self.size = size
    }

    /// Parses `<hash>_<size>` strictly: 64 lowercase hex digits, `_`, then a
    /// decimal size with no sign and no leading zeros (`0` itself is valid).
    public init?(parsing text: some StringProtocol) {
        let utf8 = Array(text.utf8)
        guard utf8.count >= 66, utf8.count <= 64 + 1 + 19, utf8[64] == UInt8(ascii: "_") else { return nil }
        for c in utf8[0..<64] where !Digest.isLowerHex(c) { return nil }
        let sizeBytes = utf8[65...]
        if sizeBytes.count > 1 && sizeBytes.first == UInt8(ascii: "0") { return nil }
        var size: Int64 = 0
        for c in sizeBytes {
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { return nil }
            let (m, o1) = size.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(Int64(c - UInt8(ascii: "0")))
            if o1 || o2 { return nil }
            size = s
        }
        self.hash = String(decoding: utf8[0..<64], as: UTF8.self)
        self.size = size
    }

    /// Parses like `init?(parsing:)` but throws a descriptive error.
    public static func parse(_ text: some StringProtocol) throws -> Digest {
        guard let d = Digest(parsing: text) else {
            throw StorageError.invalidDigest("'\(text)' is not <64 lowercase hex>_<size>")
        }
        return d
    }

    /// `<hash>_<size>`, the form used in file names and Redis keys.
    public var description: String { "\(hash)_\(size)" }

    /// The digest of `data`.
    public static func of(_ data: some DataProtocol) -> Digest {
        var h = DigestHasher()
        h.update(data)
        return h.finalize()
    }

    /// The 32 raw bytes of the hash.
    public var rawHash: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(32)
        var it = hash.utf8.makeIterator()
        while let hi = it.next(), let lo = it.next() {
            out.append(Digest.nibble(hi) << 4 | Digest.nibble(lo))
        }
        return out
    }

    public static func < (a: Digest, b: Digest) -> Bool {
        a.hash == b.hash ? a.size < b.size : a.hash < b.hash
    }

    static func isValidHash(_ s: String) -> Bool {
        let u = s.utf8
        return u.count == 64 && u.allSatisfy(isLowerHex)
    }

    /// True for `0`-`9` and `a`-`f`.
    @inline(__always) public static func isLowerHexByte(_ c: UInt8) -> Bool { isLowerHex(c) }

    @inline(__always) static func isLowerHex(_ c: UInt8) -> Bool {
        (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) || (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "f"))
    }

    @inline(__always) static func nibble(_ c: UInt8) -> UInt8 {
        c <= UInt8(ascii: "9") ? c - UInt8(ascii: "0") : c - UInt8(ascii: "a") + 10
    }
}

/// Streaming SHA-256 plus a byte count, for verifying or naming large inputs in one pass.
public struct DigestHasher {
    private var sha = SHA256()
    public private(set) var count: Int64 = 0

    public init() {}

    public mutating func update(_ data: some DataProtocol) {
        sha.update(data: data)
        count += Int64(data.count)
    }

    public mutating func update(_ buffer: UnsafeRawBufferPointer) {
        sha.update(bufferPointer: buffer)
        count += Int64(buffer.count)
    }

    public func finalize() -> Digest {
        let bytes = sha.finalize()
        var hex = ""
        hex.reserveCapacity(64)
        for b in bytes {
            hex.append(Character(Unicode.Scalar(hexDigits[Int(b >> 4)])))
            hex.append(Character(Unicode.Scalar(hexDigits[Int(b & 0xf)])))
        }
        return Digest(uncheckedHash: hex, size: count)
    }
}

private let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)
