import CASCore
import Foundation
import REAPI
import SwiftProtobuf

/// Builds one REAPI `Directory` message in canonical form: each list sorted by
/// name (bytewise), default values left out, fields in number order. That is
/// the encoding Bazel and BuildGrid hash, so equal trees get equal digests.
public struct DirectoryBuilder: Sendable {
    private var files: [Build_Bazel_Remote_Execution_V2_FileNode] = []
    private var directories: [Build_Bazel_Remote_Execution_V2_DirectoryNode] = []
    private var symlinks: [Build_Bazel_Remote_Execution_V2_SymlinkNode] = []

    public init() {}

    public mutating func addFile(_ name: String, _ digest: Digest, executable: Bool) {
        files.append(.with {
            $0.name = name
            $0.digest = .init(digest)
            $0.isExecutable = executable
        })
    }

    public mutating func addDirectory(_ name: String, _ digest: Digest) {
        directories.append(.with {
            $0.name = name
            $0.digest = .init(digest)
        })
    }

    public mutating func addSymlink(_ name: String, target: String) {
        symlinks.append(.with {
            $0.name = name
            $0.target = target
        })
    }

    /// The canonical bytes. Throws if the children would not make a valid
    /// Directory (bad or duplicate names, bad symlink targets): the same checks
    /// the mount applies when it shows a tree.
    public func encoded() throws(TreeError) -> Data {
        var message = Build_Bazel_Remote_Execution_V2_Directory()
        message.files = files.sorted { Array($0.name.utf8).lexicographicallyPrecedes(Array($1.name.utf8)) }
        message.directories = directories.sorted { Array($0.name.utf8).lexicographicallyPrecedes(Array($1.name.utf8)) }
        message.symlinks = symlinks.sorted { Array($0.name.utf8).lexicographicallyPrecedes(Array($1.name.utf8)) }
        let bytes: Data
        do {
            bytes = try message.serializedBytes()
        } catch {
            throw .unparsable(String(describing: error))
        }
        _ = try TreeDirectory(parsing: bytes)
        return bytes
    }
}

extension Build_Bazel_Remote_Execution_V2_Digest {
    init(_ d: Digest) {
        self.init()
        hash = d.hash
        sizeBytes = d.size
    }
}
