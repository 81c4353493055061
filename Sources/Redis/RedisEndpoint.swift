/// The address one connection goes to.
enum RedisEndpoint: Sendable, Hashable, CustomStringConvertible {
    case tcp(RedisHostPort)
    case unix(String)

    var description: String {
        switch self {
        case .tcp(let a): return a.description
        case .unix(let path): return "unix:\(path)"
        }
    }
}
