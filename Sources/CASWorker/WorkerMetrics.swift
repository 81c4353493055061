import CASCore

/// The worker's own samples, beside the mount's `casfs_` metrics in one registry.
public final class WorkerMetrics: Sendable {
    public static let actions = MetricInfo("casfs_worker_actions_total",
        "Actions finished, by outcome: success (exit 0), failure (non-zero exit), timeout, error (a worker-side failure, reported as the lease status), handed_back (returned to the scheduler unfinished).")
    public static let actionDuration = MetricInfo("casfs_worker_action_duration_seconds",
        "Seconds from accepting a lease to its result being ready.")
    public static let inputFetch = MetricInfo("casfs_worker_input_fetch_duration_seconds",
        "Seconds from accepting a lease until the action can start: the Action and Command read, the lazy input root mounted under its scratch layer and the outputs' parent directories made.")
    public static let uploadedBytes = MetricInfo("casfs_worker_uploaded_bytes_total",
        "Bytes of outputs, stdout and stderr sent to the CAS (blobs it already had are not sent).")
    public static let uploadedBlobs = MetricInfo("casfs_worker_uploaded_blobs_total",
        "Blobs sent to the CAS.")
    public static let leasesHeld = MetricInfo("casfs_worker_leases_held",
        "Leases the worker holds now (running, or finished and not yet reported).")
    public static let serverErrors = MetricInfo("casfs_worker_bots_errors_total",
        "Failed calls to the Bots service (each is retried with back-off).")
    public static let sessions = MetricInfo("casfs_worker_bot_sessions_created_total",
        "Bot sessions created (more than one: the scheduler lost the previous session).")

    public static let outcomes = ["success", "failure", "timeout", "error", "handed_back"]

    let metrics: Metrics
    private let counters: [String: MetricCounter]
    let duration: MetricHistogram
    let fetch: MetricHistogram
    let bytes: MetricCounter
    let blobs: MetricCounter
    let leases: MetricGauge
    let errors: MetricCounter
    let sessionsCreated: MetricCounter

    public init(_ metrics: Metrics) {
        self.metrics = metrics
        var c: [String: MetricCounter] = [:]
        for o in Self.outcomes { c[o] = metrics.counter(Self.actions, [("outcome", o)]) }
        counters = c
        let buckets: [Duration] = [.milliseconds(10), .milliseconds(50), .milliseconds(100), .milliseconds(250),
                                   .milliseconds(500), .seconds(1), .seconds(2), .seconds(5), .seconds(10),
                                   .seconds(30), .seconds(60), .seconds(300), .seconds(1800)]
        duration = metrics.histogram(Self.actionDuration, buckets: buckets)
        fetch = metrics.histogram(Self.inputFetch, buckets: buckets)
        bytes = metrics.counter(Self.uploadedBytes)
        blobs = metrics.counter(Self.uploadedBlobs)
        leases = metrics.gauge(Self.leasesHeld)
        errors = metrics.counter(Self.serverErrors)
        sessionsCreated = metrics.counter(Self.sessions)
    }

    func finished(_ outcome: String) { counters[outcome]?.add() }
}
