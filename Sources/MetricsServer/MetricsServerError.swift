import CASCore
import Foundation
import NIOCore

/// The metrics address could not be served: one line that names the address
/// and says why.
public struct MetricsServerError: Error, CustomStringConvertible {
    public let description: String

    init(binding address: ListenAddress, _ error: any Error) {
        let why: String
        switch error {
        case let e as IOError:
            why = Self.reason(errno: e.errnoCode)
        case is SocketAddressError, is SocketAddressError.UnknownHost:
            why = "the host '\(address.host)' does not resolve"
        default:
            why = "\(error)"
        }
        description = "cannot serve metrics on \(address): \(why)"
    }

    static func reason(errno code: Int32) -> String {
        switch code {
        case EADDRINUSE: return "the address is already in use"
        case EADDRNOTAVAIL: return "not an address of this machine"
        case EACCES: return "permission denied (ports below 1024 need privileges)"
        default: return String(cString: strerror(code))
        }
    }
}
