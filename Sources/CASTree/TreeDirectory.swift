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
/// digest, names are unique, and each list was in REAPI's sorted order.
public struct TreeDirectory: Sendable {
    /// The largest Directory blob accepted (a directory of ~500,000 entries).
    public static let maxBlobSize: Int64 = 64 << 20
    /// The longest name a Linux filesystem can show.
    public static let maxNameLength = 255
    /// The longest symlink target Linux accepts.
    public static let maxTargetLength = 4095

    /// All children, merged from the three lists and sorted bytewise by name.
    public let entries: [TreeEntry]
    /// The directory's own `node_properties`.
    public let properties: TreeNodeProperties
    public let subdirectoryCount: Int

    /// Parses and checks a Directory blob.
    public init(parsing bytes: Data) throws(TreeError) {
        guard Int64(bytes.count) <= Self.maxBlobSize else { throw .tooLarge(Int64(bytes.count)) }
        let message: Build_Bazel_Remote_Execution_V2_Directory
        do {
            message = try Build_Bazel_Remote_Execution_V2_Directory(serializedBytes: bytes)
        } catch {
            throw .unparsable(String(describing: error))
        }
        try Self.checkNoUnknownFields(message)

        var files: [TreeEntry] = []
        files.reserveCapacity(message.files.count)
        for f in message.files {
            let name = try Self.checkedName(f.name)
            files.append(TreeEntry(nameBytes: name, kind: .file(try Self.checkedDigest(f.digest, f.name), executable: f.isExecutable),
                                   properties: try Self.checkedProperties(f.hasNodeProperties ? f.nodeProperties : nil, f.name)))
        }
        var dirs: [TreeEntry] = []
        dirs.reserveCapacity(message.directories.count)
        for d in message.directories {
            let name = try Self.checkedName(d.name)
            dirs.append(TreeEntry(nameBytes: name, kind: .directory(try Self.checkedDigest(d.digest, d.name)),
                                  properties: TreeNodeProperties()))
        }
        var links: [TreeEntry] = []
        links.reserveCapacity(message.symlinks.count)
        for s in message.symlinks {
            let name = try Self.checkedName(s.name)
            let target = Array(s.target.utf8)
            guard !target.isEmpty else { throw .badSymlink(s.name, reason: "empty target") }
            guard !target.contains(0) else { throw .badSymlink(s.name, reason: "NUL byte in target") }
            guard target.count <= Self.maxTargetLength else { throw .badSymlink(s.name, reason: "target longer than \(Self.maxTargetLength) bytes") }
            links.append(TreeEntry(nameBytes: name, kind: .symlink(target: s.target),
                                   properties: try Self.checkedProperties(s.hasNodeProperties ? s.nodeProperties : nil, s.name)))
        }
        for list in [files, dirs, links] { try Self.checkSorted(list) }

        var all = files + dirs + links
        all.sort { $0.nameBytes.lexicographicallyPrecedes($1.nameBytes) }
        try Self.checkSorted(all)  // now only duplicates across the lists can fail
        self.entries = all
        self.subdirectoryCount = dirs.count
        self.properties = try Self.checkedProperties(message.hasNodeProperties ? message.nodeProperties : nil, ".")
    }

    /// The child with exactly these name bytes.
    public func entry(named name: some Collection<UInt8>) -> TreeEntry? {
        var lo = 0, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let e = entries[mid].nameBytes
            if e.elementsEqual(name) { return entries[mid] }
            if e.lexicographicallyPrecedes(name) { lo = mid + 1 } else { hi = mid }
        }
        return nil
    }

    // MARK: checks

    static func checkedName(_ name: String) throws(TreeError) -> [UInt8] {
        let bytes = Array(name.utf8)
        if bytes.isEmpty { throw .badName(name, reason: "empty") }
        if name == "." || name == ".." { throw .badName(name, reason: "not a child") }
        if bytes.contains(UInt8(ascii: "/")) { throw .badName(name, reason: "contains /") }
        if bytes.contains(0) { throw .badName(name, reason: "contains a NUL byte") }
        if bytes.count > maxNameLength { throw .badName(name, reason: "longer than \(maxNameLength) bytes") }
        return bytes
    }

    static func checkedDigest(_ d: Build_Bazel_Remote_Execution_V2_Digest, _ name: String) throws(TreeError) -> Digest {
        do {
            return try Digest(hash: d.hash, size: d.sizeBytes)
        } catch {
            throw .badDigest(name, reason: String(describing: error))
        }
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

    static func checkSorted(_ list: [TreeEntry]) throws(TreeError) {
        guard list.count > 1 else { return }
        for i in 1..<list.count {
            let a = list[i - 1].nameBytes, b = list[i].nameBytes
            if a == b { throw .duplicate(list[i].name) }
            if !a.lexicographicallyPrecedes(b) { throw .unsorted(list[i].name, after: list[i - 1].name) }
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
