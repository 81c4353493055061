import CASCore
import Foundation

/// A small, fast, seeded generator (SplitMix64) for reproducible test data.
public struct SplitMix: RandomNumberGenerator {
    public var state: UInt64
    public init(_ seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// `n` pseudo-random bytes, the same for the same seed.
public func randomData(_ n: Int, seed: UInt64) -> Data {
    var g = SplitMix(seed)
    var d = Data(count: n)
    d.withUnsafeMutableBytes { buf in
        let words = n / 8
        let p = buf.baseAddress!
        for i in 0..<words { p.storeBytes(of: g.next(), toByteOffset: i * 8, as: UInt64.self) }
        for i in (words * 8)..<n { p.storeBytes(of: UInt8(truncatingIfNeeded: g.next()), toByteOffset: i, as: UInt8.self) }
    }
    return d
}

/// Writes `data` to `<dir>/<name or its hash>`; returns the path and the digest.
public func writeLocalBlob(_ data: Data, in dir: String, name: String? = nil) throws -> (path: String, digest: Digest) {
    let d = Digest.of(data)
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    let p = "\(dir)/\(name ?? d.hash)"
    try data.write(to: URL(fileURLWithPath: p))
    return (p, d)
}
