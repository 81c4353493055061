import CASCore
import Foundation
import Synchronization

/// What every `Storage` promises, as checks that run against any backend or
/// decorator: a test class per storage calls each check with a fresh
/// storage. A check throws `TestSupportError` naming what broke.
public struct StorageContract: Sendable {
    /// How the storage treats the empty blob.
    public enum EmptyBlob: Sendable {
        /// Like any other blob: absent until written (a backend below the top
        /// of the stack, which never sees it in a mount).
        case likeAnyOther
        /// Present without being written (the top of the stack, and a REAPI
        /// server, which never reports it missing).
        case alwaysPresent
    }

    public struct Traits: Sendable {
        /// `deleteBlob` removes (a REAPI CAS has no delete: a no-op there).
        public var deletes = true
        public var emptyBlob = EmptyBlob.likeAnyOther
        /// Reads check bytes against the digest: damaged bytes are an error
        /// (or absent), never returned, verified or not.
        public var verifiesReads = false
        /// Bytes may be damaged by `damage` without the storage noticing at
        /// once (false for memory, whose bytes nothing else can touch).
        public var canBeDamaged = true

        public init(deletes: Bool = true, emptyBlob: EmptyBlob = .likeAnyOther, verifiesReads: Bool = false,
                    canBeDamaged: Bool = true) {
            self.deletes = deletes
            self.emptyBlob = emptyBlob
            self.verifiesReads = verifiesReads
            self.canBeDamaged = canBeDamaged
        }
    }

    public let name: String
    public let traits: Traits
    /// Sizes of the blobs the checks write (small ones, and one large
    /// enough to take a streaming path where the storage has one).
    public let sizes: [Int]
    /// Damages the stored copy of a blob behind the storage's back (same
    /// length, other bytes), so that no layer holds the good bytes any more.
    public let damage: (@Sendable (Digest) throws -> Void)?
    private let storage: any Storage

    public init(_ name: String, _ storage: any Storage, traits: Traits = Traits(), sizes: [Int] = [1, 1000, 300_000],
                damage: (@Sendable (Digest) throws -> Void)? = nil) {
        self.name = name
        self.storage = storage
        self.traits = traits
        self.sizes = sizes
        self.damage = damage
    }

    // MARK: helpers

    func fail(_ what: String) -> TestSupportError { TestSupportError("\(name): \(what)") }

    func expect(_ ok: Bool, _ what: @autoclosure () -> String) throws {
        if !ok { throw fail(what()) }
    }

    /// Blobs of the contract's sizes; `seed` keeps checks apart.
    func blobs(_ seed: UInt64) -> [(Digest, Data)] {
        sizes.enumerated().map { i, n in
            let data = randomData(n, seed: seed &* 100 &+ UInt64(i))
            return (Digest.of(data), data)
        }
    }

    /// A source is right if its bytes are `data`; a source that claims to be
    /// verified must be right.
    func checkSource(_ src: BlobSource?, _ d: Digest, _ data: Data, _ op: String) throws {
        guard let src else { throw fail("\(op)(\(d)) returned nothing for a stored blob") }
        try expect(src.size == d.size, "\(op)(\(d)) has size \(src.size)")
        let got = try src.readAll()
        try expect(got == data, "\(op)(\(d)) returned other bytes (verified: \(src.isVerified))")
    }

    /// `digest` with another size: a different blob.
    static func resized(_ d: Digest, by delta: Int64) throws -> Digest {
        try Digest(hash: d.hash, size: d.size + delta)
    }

    // MARK: checks

    /// A written blob is present and reads back whole and by ranges.
    public func writeThenRead() throws {
        for (d, data) in blobs(1) {
            try storage.commitWrite(d, DataSource(data, verified: true))
            try expect(try storage.hasBlob(d), "hasBlob(\(d)) false after a write")
            try expect(try storage.missingBlobs([d]).isEmpty, "missingBlobs lists \(d) after a write")
            try checkSource(try storage.getBlob(d), d, data, "getBlob")
            try checkSource(try storage.openBlob(d), d, data, "openBlob")
            let mid = data.count / 2
            let range = try storage.read(d, offset: Int64(mid), length: data.count - mid + 10)
            try expect(range == data.subdata(in: mid..<data.count), "read(\(d), \(mid)) returned other bytes")
            let past = try storage.read(d, offset: Int64(data.count), length: 10)
            try expect(past == Data(), "read past the end of \(d) returned \(String(describing: past?.count)) bytes")
            // A second write of the same blob changes nothing.
            try storage.commitWrite(d, DataSource(data, verified: true))
            try checkSource(try storage.getBlob(d), d, data, "getBlob after a second write")
        }
    }

    /// The size is part of a blob's identity: the same hash with another
    /// size is another (absent) blob.
    public func sizeIsPartOfIdentity() throws {
        for (d, data) in blobs(2) where d.size > 1 {
            try storage.commitWrite(d, DataSource(data, verified: true))
            for other in [try Self.resized(d, by: 1), try Self.resized(d, by: -1)] {
                try expect(try !storage.hasBlob(other), "hasBlob(\(other)) true; only \(d) was written")
                try expect(try storage.getBlob(other) == nil, "getBlob(\(other)) returned \(d)'s bytes")
                try expect(try storage.openBlob(other) == nil, "openBlob(\(other)) returned \(d)'s bytes")
                try expect(try storage.read(other, offset: 0, length: 10) == nil, "read(\(other)) returned \(d)'s bytes")
                try expect(try storage.missingBlobs([d, other]) == [other], "missingBlobs([\(d), \(other)]) is not [\(other)]")
                try expect(try storage.bulkReadBlobs([other])[other] == nil, "bulkReadBlobs returned \(other)")
            }
            try expect(try storage.hasBlob(d), "\(d) gone after asking for other sizes")
        }
    }

    /// A blob never written: absent everywhere, deletes of it are harmless.
    public func absentBlob() throws {
        let d = Digest.of(Data("never written \(name)".utf8))
        try expect(try !storage.hasBlob(d), "hasBlob of a blob never written")
        try expect(try storage.getBlob(d) == nil, "getBlob of a blob never written")
        try expect(try storage.openBlob(d) == nil, "openBlob of a blob never written")
        try expect(try storage.read(d, offset: 0, length: 1) == nil, "read of a blob never written")
        try expect(try storage.missingBlobs([d]) == [d], "missingBlobs does not list a blob never written")
        try expect(try storage.bulkReadBlobs([d]).isEmpty, "bulkReadBlobs returned a blob never written")
        try storage.deleteBlob(d)
        try expect(storage.bulkDelete([d]).isEmpty, "bulkDelete of an absent blob reported a failure")
    }

    /// Bulk calls: one status per blob, in order (a blob whose bytes are not
    /// its size fails alone); missingBlobs is the absent subset; bulk reads
    /// return exactly the present blobs.
    public func bulkOperations() throws {
        let good = blobs(3) + blobs(4)
        let (bd, bdata) = blobs(5)[1]
        let bad = (bd, bdata + Data([7]))  // one byte more than its size says
        var batch = good.map { ($0.0, $0.1) }
        batch.insert(bad, at: 2)
        let statuses = storage.bulkUpdateBlobs(batch)
        try expect(statuses.count == batch.count, "bulkUpdateBlobs returned \(statuses.count) statuses for \(batch.count) blobs")
        for (i, s) in statuses.enumerated() {
            if i == 2 {
                try expect(s != nil, "bulkUpdateBlobs accepted bytes longer than the digest's size")
            } else {
                try expect(s == nil, "bulkUpdateBlobs status \(i) (\(batch[i].0)): \(String(describing: s))")
            }
        }
        try expect(try !storage.hasBlob(bd), "the rejected blob \(bd) is present")
        let absent = Digest.of(Data("absent \(name)".utf8))
        let asked = good.map(\.0) + [bd, absent]
        let missing = try storage.missingBlobs(asked)
        try expect(Set(missing) == [bd, absent] && missing.count == 2, "missingBlobs returned \(missing), not [\(bd), \(absent)]")
        let read = try storage.bulkReadBlobs(asked)
        try expect(Set(read.keys) == Set(good.map(\.0)), "bulkReadBlobs returned \(read.count) of \(good.count) present blobs (or absent ones)")
        for (d, data) in good { try expect(read[d] == data, "bulkReadBlobs returned other bytes for \(d)") }
        // Present blobs written again: OK, unchanged.
        try expect(storage.bulkUpdateBlobs(good).allSatisfy { $0 == nil }, "rewriting present blobs failed")
        for (d, data) in good { try checkSource(try storage.getBlob(d), d, data, "getBlob after a bulk rewrite") }
    }

    /// Deletes remove one blob and leave the others (a storage that cannot
    /// delete keeps them and reports no error).
    public func delete() throws {
        let all = blobs(6)
        for (d, data) in all { try storage.commitWrite(d, DataSource(data, verified: true)) }
        let (first, _) = all[0]
        try storage.deleteBlob(first)
        try expect(try storage.hasBlob(first) != traits.deletes, "hasBlob(\(first)) after its delete")
        try expect((try storage.getBlob(first) == nil) == traits.deletes, "getBlob(\(first)) after its delete")
        try expect((try storage.openBlob(first) == nil) == traits.deletes, "openBlob(\(first)) after its delete")
        for (d, data) in all.dropFirst() { try checkSource(try storage.getBlob(d), d, data, "getBlob of a blob not deleted") }
        let rest = all.dropFirst().map(\.0)
        let absent = Digest.of(Data("absent too \(name)".utf8))
        try expect(storage.bulkDelete(rest + [absent]).isEmpty, "bulkDelete reported failures")
        for d in rest { try expect(try storage.hasBlob(d) != traits.deletes, "hasBlob(\(d)) after bulkDelete") }
        if traits.deletes {
            try expect(try Set(storage.missingBlobs(all.map(\.0))) == Set(all.map(\.0)), "missingBlobs after deleting everything")
            // A deleted blob can be written again.
            try storage.commitWrite(first, DataSource(all[0].1, verified: true))
            try checkSource(try storage.getBlob(first), first, all[0].1, "getBlob after a rewrite of a deleted blob")
        }
    }

    /// The empty blob, as `traits.emptyBlob` says.
    public func emptyBlob() throws {
        let e = Digest.empty
        switch traits.emptyBlob {
        case .alwaysPresent:
            try expect(try storage.hasBlob(e), "the empty blob is absent")
            try expect(try storage.missingBlobs([e]).isEmpty, "missingBlobs lists the empty blob")
            try expect(try storage.bulkReadBlobs([e]) == [e: Data()], "bulkReadBlobs does not return the empty blob")
        case .likeAnyOther:
            try expect(try !storage.hasBlob(e), "the empty blob is present before it was written")
            try expect(try storage.missingBlobs([e]) == [e], "missingBlobs does not list the unwritten empty blob")
            try storage.commitWrite(e, DataSource(Data(), verified: true))
            try expect(try storage.hasBlob(e), "the empty blob is absent after its write")
        }
        try checkSource(try storage.getBlob(e), e, Data(), "getBlob(empty)")
        try checkSource(try storage.openBlob(e), e, Data(), "openBlob(empty)")
        try expect(try storage.read(e, offset: 0, length: 10) == Data(), "read(empty)")
        try storage.commitWrite(e, DataSource(Data(), verified: true))
        try expect(storage.bulkUpdateBlobs([(e, Data())]) == [nil], "bulkUpdateBlobs of the empty blob failed")
    }

    /// Many threads writing, reading, asking and deleting at once: every
    /// read is either absent or the right bytes, nothing throws, and every
    /// blob written last is there at the end.
    public func concurrentUse(threads: Int = 8, rounds: Int = 60) throws {
        let pool = (0..<24).map { i -> (Digest, Data) in
            let data = randomData(100 + (i * 997) % 40_000, seed: 7000 + UInt64(i))
            return (Digest.of(data), data)
        }
        let problems = Mutex<[String]>([])
        let storage = self.storage
        let deletes = traits.deletes
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            var g = SplitMix(UInt64(t) &+ 99)
            func note(_ s: String) { problems.withLock { $0.append(s) } }
            for _ in 0..<rounds {
                let (d, data) = pool[Int(g.next() % UInt64(pool.count))]
                do {
                    switch g.next() % 6 {
                    case 0, 1:
                        try storage.commitWrite(d, DataSource(data, verified: true))
                    case 2:
                        if let src = try storage.getBlob(d), try src.readAll() != data { note("getBlob(\(d)) returned other bytes") }
                    case 3:
                        if let got = try storage.read(d, offset: 0, length: data.count), got != data { note("read(\(d)) returned other bytes") }
                    case 4:
                        let some = (0..<4).map { _ in pool[Int(g.next() % UInt64(pool.count))] }
                        for (k, v) in try storage.bulkReadBlobs(some.map(\.0)) where some.first(where: { $0.0 == k })?.1 != v {
                            note("bulkReadBlobs returned other bytes for \(k)")
                        }
                        _ = try storage.missingBlobs(some.map(\.0))
                    default:
                        if deletes && g.next() % 3 == 0 { try storage.deleteBlob(d) } else { _ = try storage.hasBlob(d) }
                    }
                } catch {
                    note("\(d): \(error)")
                }
            }
        }
        let found = problems.withLock { $0 }
        try expect(found.isEmpty, "concurrent use: \(found.prefix(10))")
        for (d, data) in pool { try storage.commitWrite(d, DataSource(data, verified: true)) }
        for (d, data) in pool { try checkSource(try storage.getBlob(d), d, data, "getBlob after concurrent use") }
    }

    /// Bytes damaged behind the storage's back are never returned as
    /// verified (and, where reads are verified, never returned at all).
    public func damagedBytesNeverReturnedVerified() throws {
        let all = blobs(8).filter { $0.0.size > 0 }
        for (d, data) in all {
            try storage.commitWrite(d, DataSource(data, verified: true))
            // Intact: a source that says it is verified holds the right bytes.
            if let src = try storage.openBlob(d), src.isVerified { try checkSource(src, d, data, "openBlob (verified, intact)") }
        }
        guard traits.canBeDamaged else { return }
        guard let damage else { throw fail("no way to damage this storage's bytes was given") }
        for (d, data) in all {
            try damage(d)
            // Bulk reads first: they must not leave damaged bytes anywhere as verified.
            var bulk: [Digest: Data] = [:]
            do { bulk = try storage.bulkReadBlobs([d]) } catch {}
            if let got = bulk[d], got != data, traits.verifiesReads { throw fail("bulkReadBlobs returned damaged bytes of \(d)") }
            for op in ["getBlob", "openBlob", "read", "getBlob again"] {
                let src: BlobSource?
                do {
                    switch op {
                    case "openBlob": src = try storage.openBlob(d)
                    case "read": src = try storage.read(d, offset: 0, length: data.count).map { DataSource($0) }
                    default: src = try storage.getBlob(d)
                    }
                } catch {
                    continue  // an error is a right answer
                }
                guard let src else { continue }  // so is "absent"
                let got: Data
                do { got = try src.readAll() } catch { continue }
                if got != data {
                    try expect(!src.isVerified, "\(op)(\(d)) returned damaged bytes marked verified")
                    try expect(!traits.verifiesReads, "\(op)(\(d)) returned damaged bytes")
                }
            }
        }
    }
}
