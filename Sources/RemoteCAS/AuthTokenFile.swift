import Foundation
import Synchronization

/// A bearer token kept in a file, as BuildGrid's client reads it: the whole
/// file trimmed of white space, used for `refreshSeconds` and then read again
/// on the next call after that (nothing runs in the background).
///
/// Unlike BuildGrid, the file is read once when the storage is created, so a
/// missing or unreadable file is a set-up error. When a later re-read fails
/// (the file is being replaced, say) the previous token stays in use and the
/// file is tried again on the next call.
final class AuthTokenFile: Sendable {
    let path: String
    let refreshSeconds: Double
    private struct State {
        var token: String
        var readAt: ContinuousClock.Instant
        var failing: Bool
    }
    private let state: Mutex<State>
    static let key = "credentials.auth-token"

    init(path: String, refreshSeconds: Double) throws {
        self.path = path
        self.refreshSeconds = refreshSeconds
        let token = try Self.load(path)
        state = Mutex(State(token: token, readAt: .now, failing: false))
    }

    /// The token to send now, re-reading the file when it is due.
    func current() -> String {
        state.withLock { s in
            let age = ContinuousClock.now - s.readAt
            guard age >= .milliseconds(Int64(min(refreshSeconds, 1e9) * 1000)) else { return s.token }
            do {
                let token = try Self.load(path)
                if token != s.token { log.info("auth token re-read from \(path)") }
                if s.failing { log.notice("auth token file \(path) readable again") }
                s.token = token
                s.readAt = .now
                s.failing = false
            } catch {
                if !s.failing { log.warning("\(error); keeping the previous token") }
                s.failing = true
            }
            return s.token
        }
    }

    /// The trimmed contents of the token file; an error names the file.
    static func load(_ path: String) throws -> String {
        let bytes = try CredentialFile.read(path, key: key)
        guard let text = String(bytes: bytes, encoding: .utf8) else {
            throw RemoteSetupError(key: key, "'\(path)' is not UTF-8 text")
        }
        let token = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !token.isEmpty else { throw RemoteSetupError(key: key, "'\(path)' holds no token (only white space)") }
        // The token goes into an HTTP/2 header value: visible ASCII and spaces only.
        guard token.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }) else {
            throw RemoteSetupError(key: key, "'\(path)' holds characters a gRPC header cannot carry (line breaks, control or non-ASCII characters)")
        }
        return token
    }
}
