import Foundation

/// Reads a small credential file (PEM, token) whole, with errors that name
/// the configuration key, the path and what went wrong.
enum CredentialFile {
    /// Credential files are small; anything larger is a wrong path.
    static let maxBytes = 1 << 20

    static func read(_ path: String, key: String) throws -> [UInt8] {
        guard !path.isEmpty else { throw RemoteSetupError(key: key, "empty path") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw failure(key, path, "cannot open", errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw failure(key, path, "cannot stat", errno) }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            let what = (st.st_mode & S_IFMT) == S_IFDIR ? "is a directory" : "is not a regular file"
            throw RemoteSetupError(key: key, "'\(path)' \(what)")
        }
        guard st.st_size <= Int64(maxBytes) else {
            throw RemoteSetupError(key: key, "'\(path)' is \(st.st_size) bytes; a credential file is at most \(maxBytes)")
        }
        var bytes = [UInt8](repeating: 0, count: maxBytes + 1)
        var used = 0
        while used < bytes.count {
            let n = bytes.withUnsafeMutableBytes { buf in
                Foundation.read(fd, buf.baseAddress! + used, buf.count - used)
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw failure(key, path, "cannot read", errno)
            }
            if n == 0 { break }
            used += n
        }
        guard used <= maxBytes else {
            throw RemoteSetupError(key: key, "'\(path)' grew past \(maxBytes) bytes while being read")
        }
        guard used > 0 else { throw RemoteSetupError(key: key, "'\(path)' is empty") }
        return Array(bytes[..<used])
    }

    /// A PEM file holding at least one block of `kind` ("CERTIFICATE",
    /// "PRIVATE KEY"; a key block may be "RSA PRIVATE KEY", "EC PRIVATE KEY").
    static func readPEM(_ path: String, key: String, kind: String) throws -> [UInt8] {
        let bytes = try read(path, key: key)
        let text = String(decoding: bytes, as: UTF8.self)
        let found = text.split(separator: "\n").contains { line in
            line.hasPrefix("-----BEGIN ") && line.contains(kind + "-----")
        }
        guard found else {
            throw RemoteSetupError(key: key, "'\(path)' is not a PEM file with a \(kind) (no '-----BEGIN ...\(kind)-----' line)")
        }
        return bytes
    }

    private static func failure(_ key: String, _ path: String, _ what: String, _ code: Int32) -> RemoteSetupError {
        RemoteSetupError(key: key, "\(what) '\(path)': \(String(cString: strerror(code)))")
    }
}
