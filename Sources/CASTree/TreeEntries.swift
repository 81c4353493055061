import CASCore
import Foundation

/// The children of a `TreeDirectory`, sorted bytewise by name, kept compact:
/// names in one byte array, digests as raw hash words, properties only for
/// the children that have any. A directory of a million files costs about
/// 60 bytes per child plus its names (the parsed messages it came from cost
/// several times that); a `TreeEntry` is made when one is asked for.
public struct TreeEntries: RandomAccessCollection, Sendable {
    final class Store: Sendable {
        /// Every name, one after the other; `nameEnds[i]` is where name i ends.
        let names: [UInt8]
        let nameEnds: [UInt32]
        /// 0 file, 1 executable file, 2 directory, 3 symlink.
        let kinds: [UInt8]
        /// Index into `hashes`/`sizes` (files, directories) or `targets` (symlinks).
        let slots: [UInt32]
        /// Four words per digest, the hash bytes in order.
        let hashes: [UInt64]
        let sizes: [Int64]
        let targets: [String]
        let properties: [Int: TreeNodeProperties]

        init(names: [UInt8], nameEnds: [UInt32], kinds: [UInt8], slots: [UInt32], hashes: [UInt64], sizes: [Int64],
             targets: [String], properties: [Int: TreeNodeProperties]) {
            self.names = names
            self.nameEnds = nameEnds
            self.kinds = kinds
            self.slots = slots
            self.hashes = hashes
            self.sizes = sizes
            self.targets = targets
            self.properties = properties
        }
    }

    let store: Store

    public var startIndex: Int { 0 }
    public var endIndex: Int { store.kinds.count }

    public subscript(i: Int) -> TreeEntry {
        TreeEntry(nameBytes: nameBytes(i), kind: kind(i), properties: store.properties[i] ?? TreeNodeProperties())
    }

    func nameRange(_ i: Int) -> Range<Int> {
        (i == 0 ? 0 : Int(store.nameEnds[i - 1]))..<Int(store.nameEnds[i])
    }

    public func nameBytes(_ i: Int) -> [UInt8] { Array(store.names[nameRange(i)]) }

    public func kind(_ i: Int) -> TreeEntry.Kind {
        let slot = Int(store.slots[i])
        switch store.kinds[i] {
        case 0, 1: return .file(digest(slot), executable: store.kinds[i] == 1)
        case 2: return .directory(digest(slot))
        default: return .symlink(target: store.targets[slot])
        }
    }

    /// True for a plain or executable file.
    public func isFile(_ i: Int) -> Bool { store.kinds[i] <= 1 }

    /// The digest of a file or directory child (nil for a symlink).
    public func digest(at i: Int) -> Digest? {
        store.kinds[i] <= 2 ? digest(Int(store.slots[i])) : nil
    }

    private func digest(_ slot: Int) -> Digest {
        let hex = String(unsafeUninitializedCapacity: 64) { buf in
            for w in 0..<4 {
                let word = store.hashes[slot * 4 + w]
                for b in 0..<8 {
                    let byte = UInt8(truncatingIfNeeded: word >> (8 * UInt64(b)))
                    buf[w * 16 + b * 2] = hexDigit(byte >> 4)
                    buf[w * 16 + b * 2 + 1] = hexDigit(byte & 0xf)
                }
            }
            return 64
        }
        // The hash was checked when parsed: 64 lowercase hex digits.
        return try! Digest(hash: hex, size: store.sizes[slot])
    }

    /// The index of the child named exactly `name`, by binary search.
    public func index(named name: some Collection<UInt8>) -> Int? {
        let wanted = Array(name)
        return store.names.withUnsafeBufferPointer { all -> Int? in
            var lo = 0, hi = count
            while lo < hi {
                let mid = (lo + hi) / 2
                let r = nameRange(mid)
                let c = compareBytes(UnsafeBufferPointer(rebasing: all[r]), wanted)
                if c == 0 { return mid }
                if c < 0 { lo = mid + 1 } else { hi = mid }
            }
            return nil
        }
    }

    /// Bytes held by this list (for cache accounting).
    var memoryCost: Int {
        store.names.count + store.nameEnds.count * 4 + store.kinds.count + store.slots.count * 4
            + store.hashes.count * 8 + store.sizes.count * 8 + store.targets.reduce(0) { $0 + 16 + $1.utf8.count }
            + store.properties.count * 64
    }
}

@inline(__always)
private func hexDigit(_ v: UInt8) -> UInt8 { v < 10 ? UInt8(ascii: "0") + v : UInt8(ascii: "a") + v - 10 }

/// Bytewise order: negative, zero or positive.
private func compareBytes(_ a: UnsafeBufferPointer<UInt8>, _ b: [UInt8]) -> Int {
    let n = min(a.count, b.count)
    for i in 0..<n where a[i] != b[i] { return Int(a[i]) - Int(b[i]) }
    return a.count - b.count
}

/// Collects children in order into a `TreeEntries`.
struct TreeEntriesBuilder {
    private var names: [UInt8] = []
    private var nameEnds: [UInt32] = []
    private var kinds: [UInt8] = []
    private var slots: [UInt32] = []
    private var hashes: [UInt64] = []
    private var sizes: [Int64] = []
    private var targets: [String] = []
    private var properties: [Int: TreeNodeProperties] = [:]

    init(capacity: Int) {
        nameEnds.reserveCapacity(capacity)
        kinds.reserveCapacity(capacity)
        slots.reserveCapacity(capacity)
    }

    /// The name bytes of the last child added.
    var lastName: ArraySlice<UInt8>? {
        guard let end = nameEnds.last else { return nil }
        let start = nameEnds.count > 1 ? Int(nameEnds[nameEnds.count - 2]) : 0
        return names[start..<Int(end)]
    }

    mutating func add(name: some Collection<UInt8>, kind: UInt8, hashWords: (UInt64, UInt64, UInt64, UInt64)? = nil,
                      size: Int64 = 0, target: String? = nil, properties p: TreeNodeProperties) {
        names.append(contentsOf: name)
        nameEnds.append(UInt32(names.count))
        kinds.append(kind)
        if let target {
            slots.append(UInt32(targets.count))
            targets.append(target)
        } else if let w = hashWords {
            slots.append(UInt32(sizes.count))
            hashes += [w.0, w.1, w.2, w.3]
            sizes.append(size)
        }
        if !p.isEmpty { properties[kinds.count - 1] = p }
    }

    func build() -> TreeEntries {
        TreeEntries(store: .init(names: names, nameEnds: nameEnds, kinds: kinds, slots: slots, hashes: hashes,
                                 sizes: sizes, targets: targets, properties: properties))
    }
}

/// The 64 lowercase hex digits of a hash as four words (bytes in order), nil
/// if they are not that.
func hashWords(_ hex: String) -> (UInt64, UInt64, UInt64, UInt64)? {
    var w: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
    var n = 0
    var ok = true
    withUnsafeMutableBytes(of: &w) { out in
        var hi: UInt8 = 0
        for c in hex.utf8 {
            let v: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): v = c - UInt8(ascii: "a") + 10
            default: ok = false; return
            }
            guard n < 64 else { ok = false; return }
            if n % 2 == 0 { hi = v } else { out[n / 2] = hi << 4 | v }
            n += 1
        }
    }
    return ok && n == 64 ? w : nil
}
