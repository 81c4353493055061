import Synchronization

/// A bounded set that forgets its oldest members first.
final class RecentSet<Element: Hashable & Sendable>: Sendable {
    private let capacity: Int
    private let state = Mutex<(members: Set<Element>, order: [Element], head: Int)>(([], [], 0))

    init(capacity: Int) { self.capacity = max(1, capacity) }

    func contains(_ e: Element) -> Bool { state.withLock { $0.members.contains(e) } }

    func insert(_ e: Element) {
        state.withLock { s in
            guard s.members.insert(e).inserted else { return }
            if s.order.count < capacity {
                s.order.append(e)
            } else {
                s.members.remove(s.order[s.head])
                s.order[s.head] = e
                s.head = (s.head + 1) % capacity
            }
        }
    }

    /// Forgets `e` (its slot is reused when it comes round).
    func remove(_ e: Element) { state.withLock { _ = $0.members.remove(e) } }
}
