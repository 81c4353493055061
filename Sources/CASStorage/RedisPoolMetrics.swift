import CASCore
import Redis
import Synchronization

/// A Redis pool's own numbers as samples of the index node that uses it:
/// open connections, failures, retries and reconnects. The pool counts them
/// (`RedisPool.Statistics`); before each export the counters are raised by
/// what it counted since the export before.
enum RedisPoolMetrics {
    /// `errors`: the node's error counter, which the index also raises for
    /// error replies (the pool returns those without counting them).
    static func register(_ pool: RedisPool, _ scope: MetricScope, errors: MetricCounter) {
        let connections = scope.gauge(MetricCatalog.redisConnections)
        let retries = scope.counter(MetricCatalog.redisRetries)
        let reconnects = scope.counter(MetricCatalog.redisReconnects)
        let exported = Mutex(RedisPool.Statistics())
        scope.metrics.onCollect { [pool] in
            connections.set(Int64(pool.openConnections))
            // Read and remembered under one lock: two exports at once never
            // add the same failures twice.
            let (now, before) = exported.withLock { last in
                let now = pool.statistics
                defer { last = now }
                return (now, last)
            }
            errors.add(now.failures &- before.failures)
            retries.add(now.retries &- before.retries)
            reconnects.add(now.reconnects &- before.reconnects)
        }
    }
}
