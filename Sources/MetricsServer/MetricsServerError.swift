import CASCore
import Foundation

/// The metrics address could not be served: one line that names the address
/// and says why.
public struct MetricsServerError: Error, CustomStringConvertible {
    public let description: String

    init(binding address: ListenAddress, errno code: Int32, call: String) {
        description = "cannot serve metrics on \(address): \(Self.reason(errno: code, call: call))"
    }

    init(unresolved address: ListenAddress) {
        description = "cannot serve metrics on \(address): the host '\(address.host)' does not resolve"
    }

    static func reason(errno code: Int32, call: String) -> String {
        switch code {
        case EADDRINUSE: return "the address is already in use"
        case EADDRNOTAVAIL: return "not an address of this machine"
        case EACCES: return "permission denied (ports below 1024 need privileges)"
        default: return "\(call): \(String(cString: strerror(code)))"
        }
    }
}
