import Foundation
import TestSupport

/// TestSupport's RedisServer (TCP) plus redis-cli access for the mount tests.
final class TestRedis: @unchecked Sendable {
    let server: RedisServer
    let port: Int

    private init(server: RedisServer) throws {
        self.server = server
        guard let port = server.port else { throw MountError("redis server has no TCP port") }
        self.port = port
    }

    static func start(dir: String) throws -> TestRedis {
        try TestRedis(server: RedisServer.tcp())
    }

    /// Starts the server again on the same port; it loads what `stop(saving: true)` saved.
    func startAgain() throws { try server.start() }

    /// Stops the server; with `saving`, its data is written first so that a restart keeps it.
    func stop(saving: Bool = false) {
        if saving { cli("SAVE") }
        server.stop()
    }

    /// Runs one redis-cli command and returns its output.
    @discardableResult
    func cli(_ args: String) -> String {
        runShell("redis-cli -p \(port) \(args)").stdout
    }
}
