import CASStorage
import XCTest

final class MurmurHash3Tests: XCTestCase {
    /// Published MurmurHash3_x86_32 vectors (seed, bytes, result), covering
    /// every tail length and non-zero seeds.
    func testStandardVectors() {
        let cases: [([UInt8], UInt32, UInt32)] = [
            ([], 0, 0),
            ([], 1, 0x514e_28b7),
            ([], 0xffff_ffff, 0x81f1_6f39),
            ([0xff, 0xff, 0xff, 0xff], 0, 0x7629_3b50),
            ([0x21, 0x43, 0x65, 0x87], 0, 0xf55b_516b),
            ([0x21, 0x43, 0x65, 0x87], 0x5082_edee, 0x2362_f9de),
            ([0x21, 0x43, 0x65], 0, 0x7e4a_8634),
            ([0x21, 0x43], 0, 0xa0f7_b07a),
            ([0x21], 0, 0x7266_1cf4),
            ([0, 0, 0, 0], 0, 0x2362_f9de),
            ([0, 0, 0], 0, 0x85f0_b427),
            ([0, 0], 0, 0x30f4_c306),
            ([0], 0, 0x514e_28b7),
        ]
        for (bytes, seed, expected) in cases {
            XCTAssertEqual(murmurHash3x86_32(bytes, seed: seed), expected, "\(bytes) seed \(seed)")
        }
        XCTAssertEqual(murmurHash3x86_32("Hello, world!", seed: 1234), 0xfaf6_cdb3)
        XCTAssertEqual(murmurHash3x86_32("The quick brown fox jumps over the lazy dog"), 0x2e4f_f723)
        XCTAssertEqual(murmurHash3x86_32("é"), 269_551_495, "UTF-8 bytes, as Python's mmh3 hashes a str")
    }

    /// Scores BuildGrid 0.8.16 computes for its shard choice
    /// (`mmh3.hash(name + "\t" + hash, signed=False)`).
    func testBuildGridShardScores() {
        let cases: [(String, String, UInt32)] = [
            ("a", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 4_288_917_350),
            ("b", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 1_517_390_671),
            ("a", "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", 805_487_720),
            ("b", "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", 1_711_351_743),
            ("a", "a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447", 2_523_385_543),
            ("b", "a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447", 4_072_545_206),
            ("a", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 3_992_424_330),
            ("b", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 1_852_694_248),
            ("c", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 81_632_119),
            ("a", "40aff2e9d2d8922e47afd4648e6967497158785fbd1da870e7110266bf944880", 184_422_747),
            ("b", "40aff2e9d2d8922e47afd4648e6967497158785fbd1da870e7110266bf944880", 268_131_936),
        ]
        for (name, hash, expected) in cases {
            XCTAssertEqual(ShardedStorage.score(shard: name, hash: hash), expected, "\(name)\\t\(hash)")
        }
    }
}
