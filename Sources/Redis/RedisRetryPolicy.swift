import Foundation

/// How often and after which delays a failed command is sent again:
/// BuildGrid's `retries` with its "equal jitter" back-off. Before retry n
/// (1-based) the caller sleeps t/2 plus a random part up to t/2, where
/// t = min(cap, base · 2ⁿ); with BuildGrid's base 8 ms and cap 512 ms that is
/// 8–16 ms, 16–32 ms, 32–64 ms for the default three retries.
struct RedisRetryPolicy: Sendable {
    let retries: Int
    let base: Double
    let cap: Double

    init(_ config: RedisConfig) {
        retries = max(0, config.retries)
        base = config.retryBackoffBase
        cap = config.retryBackoffCap
    }

    /// Seconds to sleep before retry `n` (1-based).
    func delay(beforeRetry n: Int) -> Double {
        let exponent = Double(min(max(n, 0), 64))
        var t = min(cap, base * pow(2, exponent)) / 2
        if !t.isFinite || t < 0 { t = 0 }
        return t + Double.random(in: 0...t)
    }
}
