import Foundation

/// Errors raised by the storage stack. Each maps to one errno at the FUSE layer.
public enum StorageError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A digest string or value is malformed.
    case invalidDigest(String)
    /// The bytes offered or fetched do not match the digest.
    case digestMismatch(expected: Digest, actual: Digest)
    /// The bytes offered or fetched are not as long as the digest says.
    case sizeMismatch(expected: Digest, actualSize: Int64)
    /// The backing store has no room (ENOSPC, EFBIG, or a configured limit).
    case storageFull(String)
    /// A dependency (Redis, a remote CAS) cannot be reached or answered with an error.
    case unavailable(String)
    /// An I/O error with its errno.
    case io(errno: Int32, String)
    /// The operation is not supported by this storage.
    case unsupported(String)
    /// A source casfs had not checked returned bytes that do not hash to the
    /// digest. `source` names where they came from (for the log).
    case corrupt(Digest, source: String)
    /// The other side refused the request for good (a remote CAS's
    /// INVALID_ARGUMENT, such as bytes that do not match the digest):
    /// sending it again cannot help.
    case rejected(String)

    public var description: String {
        switch self {
        case .invalidDigest(let m): return "invalid digest: \(m)"
        case .digestMismatch(let e, let a): return "digest mismatch: expected \(e), got \(a)"
        case .sizeMismatch(let e, let a): return "size mismatch: expected \(e.size) bytes for \(e), got \(a)"
        case .storageFull(let m): return "storage full: \(m)"
        case .unavailable(let m): return "unavailable: \(m)"
        case .io(let e, let m): return "\(m): \(String(cString: strerror(e)))"
        case .unsupported(let m): return "unsupported: \(m)"
        case .corrupt(let d, let source): return "corrupt bytes for \(d) from \(source)"
        case .rejected(let m): return "refused: \(m)"
        }
    }

    /// The errno a filesystem should report for this error.
    public var errno: Int32 {
        switch self {
        case .invalidDigest: return EINVAL
        case .digestMismatch, .sizeMismatch: return EIO
        case .storageFull: return ENOSPC
        case .unavailable: return EIO
        case .io(let e, _): return e
        case .unsupported: return ENOTSUP
        case .corrupt: return EIO
        case .rejected: return EIO
        }
    }

    /// True when trying the same call again cannot succeed (the bytes or the
    /// request are wrong); false for what may pass (an unreachable or full
    /// storage, an I/O error).
    public var isPermanent: Bool {
        switch self {
        case .invalidDigest, .digestMismatch, .sizeMismatch, .unsupported, .corrupt, .rejected: return true
        case .storageFull, .unavailable, .io: return false
        }
    }

    /// Wraps the current `errno` after a failed system call.
    public static func posix(_ what: String, _ code: Int32 = Foundation.errno) -> StorageError {
        if code == ENOSPC || code == EFBIG || code == EDQUOT {
            return .storageFull("\(what): \(String(cString: strerror(code)))")
        }
        return .io(errno: code, what)
    }
}
