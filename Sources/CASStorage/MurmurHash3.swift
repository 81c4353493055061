/// MurmurHash3, x86 32-bit variant (Austin Appleby's public-domain design):
/// 4-byte little-endian blocks, the standard tail and final mix. The result
/// is the unsigned 32-bit value (Python's `mmh3.hash(..., signed=False)`).
public func murmurHash3x86_32<Bytes: Collection<UInt8>>(_ bytes: Bytes, seed: UInt32 = 0) -> UInt32 {
    let c1: UInt32 = 0xcc9e_2d51
    let c2: UInt32 = 0x1b87_3593

    func scramble(_ k: UInt32) -> UInt32 {
        (k &* c1).rotatedLeft(15) &* c2
    }

    var h = seed
    var block: UInt32 = 0
    var filled = 0
    for byte in bytes {
        block |= UInt32(byte) << (8 * UInt32(filled))
        filled += 1
        if filled == 4 {
            h ^= scramble(block)
            h = h.rotatedLeft(13) &* 5 &+ 0xe654_6b64
            block = 0
            filled = 0
        }
    }
    // The 1 to 3 bytes left over are mixed in without the block step.
    if filled > 0 { h ^= scramble(block) }

    // The length is taken modulo 2^32, as the reference does.
    h ^= UInt32(truncatingIfNeeded: bytes.count)
    h ^= h >> 16
    h = h &* 0x85eb_ca6b
    h ^= h >> 13
    h = h &* 0xc2b2_ae35
    h ^= h >> 16
    return h
}

/// MurmurHash3 x86 32-bit of a string's UTF-8 bytes.
public func murmurHash3x86_32(_ text: String, seed: UInt32 = 0) -> UInt32 {
    murmurHash3x86_32(text.utf8, seed: seed)
}

extension UInt32 {
    @inline(__always) func rotatedLeft(_ n: UInt32) -> UInt32 {
        (self << n) | (self >> (32 - n))
    }
}
