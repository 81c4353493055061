import CASCore
import Foundation
import REAPI
import SwiftProtobuf

/// Properties a REAPI client may attach to a node (`NodeProperties`). Only the
/// two the filesystem can show are kept; other named properties are ignored.
public struct TreeNodeProperties: Sendable, Hashable {
    /// Modification time, seconds and nanoseconds since the epoch.
    public var mtime: TreeTime?
    /// Permission bits from `unix_mode`, without setuid, setgid and sticky
    /// (a tree out of a CAS never grants privileges).
    public var mode: UInt32?

    public init(mtime: TreeTime? = nil, mode: UInt32? = nil) {
        self.mtime = mtime
        self.mode = mode
    }

    public var isEmpty: Bool { mtime == nil && mode == nil }
}

public struct TreeTime: Sendable, Hashable {
    public var seconds: Int64
    public var nanos: Int32

    public init(seconds: Int64, nanos: Int32) {
        self.seconds = seconds
        self.nanos = nanos
    }
}

/// One child of a directory.
public struct TreeEntry: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case file(Digest, executable: Bool)
        case directory(Digest)
        case symlink(target: String)
    }

    /// The name as bytes (names compare and match bytewise, never by Unicode equivalence).
    public let nameBytes: [UInt8]
    public let kind: Kind
    public let properties: TreeNodeProperties

    public var name: String { String(decoding: nameBytes, as: UTF8.self) }
}

/// Why a blob is not a usable REAPI `Directory`. Each case names the offending
/// child so that the log says what is wrong with which tree.
public enum TreeError: Error, Sendable, Equatable, CustomStringConvertible {
    case unparsable(String)
    case unknownFields(String)
    case badName(String, reason: String)
    case unsorted(String, after: String)
    case duplicate(String)
    case badDigest(String, reason: String)
    case badSymlink(String, reason: String)
    case badProperties(String, reason: String)
    case tooLarge(Int64)

    public var description: String {
        switch self {
        case .unparsable(let m): return "not a REAPI Directory: \(m)"
        case .unknownFields(let w): return "not a canonical REAPI Directory: unknown fields in \(w)"
        case .badName(let n, let r): return "bad child name \(quoted(n)): \(r)"
        case .unsorted(let n, let a): return "children out of order: \(quoted(n)) after \(quoted(a))"
        case .duplicate(let n): return "duplicate child name \(quoted(n))"
        case .badDigest(let n, let r): return "child \(quoted(n)) has a bad digest: \(r)"
        case .badSymlink(let n, let r): return "symlink \(quoted(n)): \(r)"
        case .badProperties(let n, let r): return "node properties of \(quoted(n)): \(r)"
        case .tooLarge(let s): return "Directory blob of \(s) bytes is larger than casfs accepts"
        }
    }
}

private func quoted(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        if u.value < 0x20 || u == "\"" || u == "\\" {
            out += u.escaped(asASCII: true)
        } else {
            out.unicodeScalars.append(u)
        }
    }
    return out + "\""
}

/// A parsed and checked REAPI `Directory`: every child has a valid name and
/// digest, names are unique, and each list was in REAPI's sorted order. The
/// children are kept compact (`TreeEntries`), so a directory of a million
/// entries stays affordable while the mount holds it.
public struct TreeDirectory: Sendable {
    /// The largest Directory blob accepted (a directory of about 1,500,000 files).
    public static let maxBlobSize: Int64 = 128 << 20
    /// The longest name a Linux filesystem can show.
    public static let maxNameLength = 255
    /// The longest symlink target Linux accepts.
    public static let maxTargetLength = 4095

    /// All children, merged from the three lists and sorted bytewise by name.
    public let entries: TreeEntries
    /// The directory's own `node_properties`.
    public let properties: TreeNodeProperties
    public let subdirectoryCount: Int

    /// Parses and checks a Directory blob.
    public init(parsing bytes: Data) throws(TreeError) {
        guard Int64(bytes.count) <= Self.maxBlobSize else { throw .tooLarge(Int64(bytes.count)) }
        var message: Build_Bazel_Remote_Execution_V2_Directory
        do {
            message = try Build_Bazel_Remote_Execution_V2_Directory(serializedBytes: bytes)
        } catch {
            throw .unparsable(String(describing: error))
        }
        try Self.checkNoUnknownFields(message)
        let properties = try Self.checkedProperties(message.hasNodeProperties ? message.nodeProperties : nil, ".")

        // Each child checked, each list in order (by its own rules first).
        typealias Words = (UInt64, UInt64, UInt64, UInt64)
        var fileDigests: [(Words, Int64)] = []
        fileDigests.reserveCapacity(message.files.count)
        var fileProperties: [TreeNodeProperties] = []
        fileProperties.reserveCapacity(message.files.count)
        for f in message.files {
            try Self.checkName(f.name)
            fileDigests.append(try Self.checkedDigest(f.digest, f.name))
            fileProperties.append(try Self.checkedProperties(f.hasNodeProperties ? f.nodeProperties : nil, f.name))
        }
        var dirDigests: [(Words, Int64)] = []
        dirDigests.reserveCapacity(message.directories.count)
        for d in message.directories {
            try Self.checkName(d.name)
            dirDigests.append(try Self.checkedDigest(d.digest, d.name))
        }
        var linkProperties: [TreeNodeProperties] = []
        for l in message.symlinks {
            try Self.checkName(l.name)
            let target = l.target.utf8
            guard !target.isEmpty else { throw .badSymlink(l.name, reason: "empty target") }
            guard !target.contains(0) else { throw .badSymlink(l.name, reason: "NUL byte in target") }
            guard target.count <= Self.maxTargetLength else {
                throw .badSymlink(l.name, reason: "target longer than \(Self.maxTargetLength) bytes")
            }
            linkProperties.append(try Self.checkedProperties(l.hasNodeProperties ? l.nodeProperties : nil, l.name))
        }
        try Self.checkSorted(message.files.map(\.name))
        try Self.checkSorted(message.directories.map(\.name))
        try Self.checkSorted(message.symlinks.map(\.name))

        // Merged bytewise; a name in two lists is a duplicate.
        let files = message.files, dirs = message.directories, links = message.symlinks
        var builder = TreeEntriesBuilder(capacity: files.count + dirs.count + links.count)
        var (fi, di, li) = (0, 0, 0)
        var last: String?
        while fi < files.count || di < dirs.count || li < links.count {
            var pick = -1
            var name: String?
            for (k, candidate) in [fi < files.count ? files[fi].name : nil, di < dirs.count ? dirs[di].name : nil,
                                   li < links.count ? links[li].name : nil].enumerated() {
                guard let c = candidate else { continue }
                if name == nil || c.utf8.lexicographicallyPrecedes(name!.utf8) {
                    name = c
                    pick = k
                }
            }
            let n = name!
            if let last, last.utf8.elementsEqual(n.utf8) { throw .duplicate(n) }
            switch pick {
            case 0:
                let (w, size) = fileDigests[fi]
                builder.add(name: n.utf8, kind: files[fi].isExecutable ? 1 : 0, hashWords: w, size: size,
                            properties: fileProperties[fi])
                fi += 1
            case 1:
                let (w, size) = dirDigests[di]
                builder.add(name: n.utf8, kind: 2, hashWords: w, size: size, properties: TreeNodeProperties())
                di += 1
            default:
                builder.add(name: n.utf8, kind: 3, target: links[li].target, properties: linkProperties[li])
                li += 1
            }
            last = n
        }
        message = Build_Bazel_Remote_Execution_V2_Directory()  // the parsed message goes before the list is sealed
        self.entries = builder.build()
        self.subdirectoryCount = dirs.count
        self.properties = properties
    }

    /// The child with exactly these name bytes.
    public func entry(named name: some Collection<UInt8>) -> TreeEntry? {
        entries.index(named: name).map { entries[$0] }
    }

    /// Bytes this directory holds in memory (about).
    public var memoryCost: Int { entries.memoryCost + 64 }

    // MARK: checks

    static func checkName(_ name: String) throws(TreeError) {
        let bytes = name.utf8
        if bytes.isEmpty { throw .badName(name, reason: "empty") }
        if name == "." || name == ".." { throw .badName(name, reason: "not a child") }
        if bytes.contains(UInt8(ascii: "/")) { throw .badName(name, reason: "contains /") }
        if bytes.contains(0) { throw .badName(name, reason: "contains a NUL byte") }
        if bytes.count > maxNameLength { throw .badName(name, reason: "longer than \(maxNameLength) bytes") }
    }

    /// The digest as hash words and size (what `TreeEntries` keeps).
    static func checkedDigest(_ d: Build_Bazel_Remote_Execution_V2_Digest, _ name: String) throws(TreeError)
        -> ((UInt64, UInt64, UInt64, UInt64), Int64) {
        guard let w = hashWords(d.hash) else { throw .badDigest(name, reason: "bad hash '\(d.hash)'") }
        guard d.sizeBytes >= 0 else { throw .badDigest(name, reason: "negative size \(d.sizeBytes)") }
        return (w, d.sizeBytes)
    }

    static func checkedProperties(_ p: Build_Bazel_Remote_Execution_V2_NodeProperties?, _ name: String) throws(TreeError) -> TreeNodeProperties {
        guard let p else { return TreeNodeProperties() }
        var out = TreeNodeProperties()
        if p.hasMtime {
            let t = p.mtime
            guard t.nanos >= 0, t.nanos < 1_000_000_000 else { throw .badProperties(name, reason: "mtime nanos \(t.nanos) out of range") }
            out.mtime = TreeTime(seconds: t.seconds, nanos: t.nanos)
        }
        if p.hasUnixMode {
            out.mode = p.unixMode.value & 0o777
        }
        return out
    }

    static func checkSorted(_ names: [String]) throws(TreeError) {
        guard names.count > 1 else { return }
        for i in 1..<names.count {
            let a = names[i - 1].utf8, b = names[i].utf8
            if a.elementsEqual(b) { throw .duplicate(names[i]) }
            if !a.lexicographicallyPrecedes(b) { throw .unsorted(names[i], after: names[i - 1]) }
        }
    }

    /// A canonical Directory has no fields this version of REAPI does not
    /// define. Accepting them would let arbitrary blobs (say, a text file that
    /// happens to decode as unknown fields) pass for directories.
    static func checkNoUnknownFields(_ m: Build_Bazel_Remote_Execution_V2_Directory) throws(TreeError) {
        func props(_ p: Build_Bazel_Remote_Execution_V2_NodeProperties) -> Bool {
            p.unknownFields.data.isEmpty && p.mtime.unknownFields.data.isEmpty && p.unixMode.unknownFields.data.isEmpty
                && p.properties.allSatisfy { $0.unknownFields.data.isEmpty }
        }
        guard m.unknownFields.data.isEmpty, props(m.nodeProperties) else { throw .unknownFields("the Directory") }
        for f in m.files where !(f.unknownFields.data.isEmpty && f.digest.unknownFields.data.isEmpty && props(f.nodeProperties)) {
            throw .unknownFields("file \(quoted(f.name))")
        }
        for d in m.directories where !(d.unknownFields.data.isEmpty && d.digest.unknownFields.data.isEmpty) {
            throw .unknownFields("directory \(quoted(d.name))")
        }
        for s in m.symlinks where !(s.unknownFields.data.isEmpty && props(s.nodeProperties)) {
            throw .unknownFields("symlink \(quoted(s.name))")
        }
    }
}
