import Foundation
import Synchronization

/// Runs the calls of one bulk operation that go to different child storages:
/// one after another in the caller's thread (width 0, BuildGrid's default),
/// or at the same time with at most `width` calls running across every
/// operation of the storage that owns it (BuildGrid's `thread-pool-size`).
/// The caller waits for all of them.
public final class FanOut: Sendable {
    /// Calls that may run at once; 0 runs them in the caller's thread.
    public let width: Int
    private let slots: DispatchSemaphore?
    private let queue: DispatchQueue

    public init(width: Int, label: String = "casfs.fan-out") {
        self.width = max(0, width)
        slots = width > 0 ? DispatchSemaphore(value: width) : nil
        queue = DispatchQueue(label: label, attributes: .concurrent)
    }

    /// `body(0)`, ..., `body(count - 1)`, their results in that order.
    public func map<T: Sendable>(_ count: Int, _ body: @escaping @Sendable (Int) -> T) -> [T] {
        guard let slots, count > 1 else { return (0..<count).map(body) }
        let results = Slots<T>(count)
        let group = DispatchGroup()
        for i in 0..<count {
            // The caller waits for a free slot, so no queue thread ever
            // blocks on another.
            slots.wait()
            group.enter()
            queue.async {
                defer {
                    slots.signal()
                    group.leave()
                }
                results.set(i, body(i))
            }
        }
        group.wait()
        return results.values()
    }

    /// Like `map`, for calls that may throw: every call runs, then the first
    /// error (in index order) is thrown.
    public func mapThrowing<T: Sendable>(_ count: Int, _ body: @escaping @Sendable (Int) throws -> T) throws -> [T] {
        try map(count) { i in Result { try body(i) } }.map { try $0.get() }
    }
}

/// One result per call, filled in by whichever thread ran it.
private final class Slots<T: Sendable>: Sendable {
    private let state: Mutex<[T?]>
    init(_ count: Int) { state = Mutex(Array(repeating: nil, count: count)) }
    func set(_ i: Int, _ value: T) { state.withLock { $0[i] = value } }
    func values() -> [T] { state.withLock { $0.map { $0! } } }
}
