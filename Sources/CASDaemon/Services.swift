import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import UnixSignals

/// How the daemon's services are run together: one `ServiceGroup`, which
/// starts them in order, and on SIGTERM, SIGINT or SIGHUP (or when a
/// service that ends the group returns, e.g. the mount after
/// `fusermount3 -u`) stops them in reverse order, each one finished before
/// the next is told. Every command of casfs that reacts to signals does so
/// through this (the signals are ServiceLifecycle's `UnixSignals`).
public enum Daemon {
    /// The signals that ask for an orderly stop.
    public static let shutdownSignals: [UnixSignal] = [.sigterm, .sigint, .sighup]

    /// A service that ends the whole group (gracefully) when it returns or throws.
    public static func essential(_ service: any Service, name: String) -> ServiceGroupConfiguration.ServiceConfiguration {
        .init(service: service, successTerminationBehavior: .gracefullyShutdownGroup,
              failureTerminationBehavior: .gracefullyShutdownGroup, serviceName: name)
    }

    /// A service whose end does not end the group.
    public static func auxiliary(_ service: any Service, name: String) -> ServiceGroupConfiguration.ServiceConfiguration {
        .init(service: service, successTerminationBehavior: .ignore, failureTerminationBehavior: .ignore,
              serviceName: name)
    }

    /// A group of `services` (started in order, stopped in reverse) that
    /// stops gracefully on `signals`.
    public static func group(_ services: [ServiceGroupConfiguration.ServiceConfiguration], log: Logger,
                             signals: [UnixSignal] = shutdownSignals) -> ServiceGroup {
        var config = ServiceGroupConfiguration(services: services, gracefulShutdownSignals: signals, logger: log)
        config.cancellationSignals = []
        return ServiceGroup(configuration: config)
    }

    /// Runs `body` with `signals` delivered to `onSignal` (on another
    /// thread) for as long as it runs: for commands that pass signals on to
    /// a child rather than stop services. `body` runs on a thread of its own.
    public static func withSignals<T: Sendable>(_ signals: [UnixSignal], onSignal: @escaping @Sendable (Int32) -> Void,
                                                body: @escaping @Sendable () throws -> T) async throws -> T {
        let sequence = await UnixSignalsSequence(trapping: signals)
        let listener = Task {
            for await s in sequence { onSignal(s.rawValue) }
        }
        defer { listener.cancel() }
        return try await runOnThread(body)
    }
}

/// Runs blocking `body` on a new thread (not on the concurrency pool) and
/// awaits its result.
public func runOnThread<T: Sendable>(name: String = "casfs-blocking", _ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, any Error>) in
        let t = Thread {
            do { c.resume(returning: try body()) } catch { c.resume(throwing: error) }
        }
        t.name = name
        t.start()
    }
}

/// Runs blocking `body` on a new thread and awaits it.
public func runOnThread(name: String = "casfs-blocking", _ body: @escaping @Sendable () -> Void) async {
    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
        let t = Thread {
            body()
            c.resume()
        }
        t.name = name
        t.start()
    }
}

/// Runs async `body` from synchronous code (a command's `run()` on the main
/// thread) and blocks until it ends. Never call it from a task.
public func runBlocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let result = Mutex<Result<T, any Error>?>(nil)
    let done = DispatchSemaphore(value: 0)
    Task.detached {
        do {
            let value = try await body()
            result.withLock { $0 = .success(value) }
        } catch {
            result.withLock { $0 = .failure(error) }
        }
        done.signal()
    }
    done.wait()
    return try result.withLock { $0! }.get()
}

/// Waits for the group's graceful shutdown (or the task's cancellation),
/// then runs `stop` on a thread of its own.
func untilShutdown(then stop: @escaping @Sendable () -> Void) async {
    try? await gracefulShutdown()
    await runOnThread(stop)
}
