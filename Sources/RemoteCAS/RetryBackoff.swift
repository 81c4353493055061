/// How long to wait before retrying a call, as BuildGrid's `GrpcRetrier`
/// does: after the n-th failed attempt (n = 1, 2, ...) sleep
/// `min(2^(n-1) + U[0,1), maxBackoff)` seconds; `retries` retries at most.
public struct RetryBackoff: Sendable, Equatable {
    public let retries: Int
    public let maxBackoff: Double

    /// BuildGrid's `!remote-storage` defaults.
    public static let defaultRetries = 3
    public static let defaultMaxBackoff: Double = 64
    /// Far beyond any sensible configuration; keeps the arithmetic bounded.
    public static let retryLimit = 10_000

    public init(retries: Int = defaultRetries, maxBackoff: Double = defaultMaxBackoff) throws {
        guard retries <= Self.retryLimit else {
            throw RemoteSetupError(key: "retries", "\(retries) is more than \(Self.retryLimit)")
        }
        guard maxBackoff.isFinite, maxBackoff >= 0, maxBackoff <= 86_400 else {
            throw RemoteSetupError(key: "max-backoff", "must be a number of seconds from 0 to 86400")
        }
        self.retries = max(0, retries)
        self.maxBackoff = maxBackoff
    }

    /// No retries.
    public static let none = RetryBackoff(checkedRetries: 0, maxBackoff: 0)

    private init(checkedRetries: Int, maxBackoff: Double) {
        self.retries = checkedRetries
        self.maxBackoff = maxBackoff
    }

    /// The sleep after failed attempt `attempt` (1-based), with its jitter.
    public func delay(afterAttempt attempt: Int, jitter: Double = Double.random(in: 0..<1)) -> Double {
        min(Self.exponential(attempt) + jitter, maxBackoff)
    }

    /// The longest that all retries of one call can sleep together.
    public var worstCaseTotalDelay: Double {
        var total = 0.0
        for n in stride(from: 1, through: retries, by: 1) {
            let d = min(Self.exponential(n) + 1, maxBackoff)
            if d >= maxBackoff {
                // Every later sleep is capped too.
                return total + Double(retries - n + 1) * maxBackoff
            }
            total += d
        }
        return total
    }

    private static func exponential(_ attempt: Int) -> Double {
        // 2^(n-1); beyond 2^62 every cap has long been reached.
        Double(sign: .plus, exponent: min(max(attempt - 1, 0), 62), significand: 1)
    }
}
