import CASCore

/// Starting and stopping the children of a composite storage. A child listed
/// twice (one YAML anchor used in two places) is started and stopped once.
enum ChildStorages {
    /// `children` without repeats of one instance, in order.
    static func distinct(_ children: [any Storage]) -> [any Storage] {
        var seen: Set<ObjectIdentifier> = []
        return children.filter { child in
            guard type(of: child) is AnyObject.Type else { return true }
            return seen.insert(ObjectIdentifier(child as AnyObject)).inserted
        }
    }

    static func start(_ children: [any Storage]) throws {
        for child in distinct(children) { try child.start() }
    }

    /// Stops every child, even after one fails; then throws the first error.
    static func stop(_ children: [any Storage]) throws {
        var first: Error?
        for child in distinct(children) {
            do { try child.stop() } catch {
                log.error("stopping a storage failed: \(error)")
                if first == nil { first = error }
            }
        }
        if let first { throw first }
    }
}
