import Foundation
import Synchronization

/// Collapses concurrent calls for one key into a single execution: the first
/// caller runs the work, the others wait for and share its result.
final class SingleFlight<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    private final class Call: @unchecked Sendable {
        // Written once by the leader before `done` is signalled; read after waiting.
        var result: Result<Value, Error>?
        let done = DispatchSemaphore(value: 0)
        let waiters = Atomic<Int>(0)
    }

    private let calls = Mutex<[Key: Call]>([:])

    /// Runs `work` unless a call for `key` is already under way, in which case
    /// it waits for that call's result. `shared` tells whether the result came
    /// from another caller's execution.
    func run(_ key: Key, _ work: () throws -> Value) throws -> (value: Value, shared: Bool) {
        let (call, leader) = calls.withLock { calls -> (Call, Bool) in
            if let c = calls[key] {
                c.waiters.add(1, ordering: .relaxed)
                return (c, false)
            }
            let c = Call()
            calls[key] = c
            return (c, true)
        }
        if !leader {
            call.done.wait()
            return (try call.result!.get(), true)
        }
        let result = Result { try work() }
        call.result = result
        calls.withLock { _ = $0.removeValue(forKey: key) }
        let n = call.waiters.load(ordering: .relaxed)
        for _ in 0..<n { call.done.signal() }
        return (try result.get(), false)
    }
}
