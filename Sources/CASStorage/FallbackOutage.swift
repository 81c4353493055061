import CASCore
import Foundation
import Synchronization

/// Remembers that a fallback stopped answering (a call failed as
/// `unavailable`: timed out, refused, unreachable), for `holdOff` seconds
/// after its latest such failure, or until a call succeeds. Questions that
/// can be answered from local knowledge are then not sent to it, so a
/// stalled server does not make every one of them wait for its deadline.
public final class FallbackOutage: Sendable {
    public let holdOff: Double
    private let until = Mutex<Date?>(nil)

    public init(holdOff: Double = 10) {
        self.holdOff = max(0, holdOff)
    }

    /// True while the fallback is taken to be unreachable.
    public var isActive: Bool {
        until.withLock { u in
            guard let end = u else { return false }
            if end > Date() { return true }
            u = nil
            return false
        }
    }

    /// Records the outcome of a call to the fallback. Returns true when
    /// `error` says the fallback cannot be reached (the outage starts or goes on).
    @discardableResult
    public func record(_ error: Error?) -> Bool {
        guard let error else {
            until.withLock { $0 = nil }
            return false
        }
        guard case .unavailable = StorageError.wrap(error) else { return false }
        let now = Date()
        let started = until.withLock { u -> Bool in
            defer { u = now.addingTimeInterval(holdOff) }
            return u.map { $0 <= now } ?? true
        }
        if started { log.warning("the fallback does not answer (\(error)); answering from the cache and the journal for now") }
        return true
    }
}
