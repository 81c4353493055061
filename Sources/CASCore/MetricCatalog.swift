/// Every metric casfs exports, with its help text. Storage samples carry a
/// `node` label (the node's place in the configuration); FUSE samples an
/// `op` label where they are per operation.
public enum MetricCatalog {
    // Caches (!with-cache-storage).
    public static let cacheHits = MetricInfo("casfs_cache_hits_total", "Reads answered by the cache of a with-cache storage.")
    public static let cacheMisses = MetricInfo("casfs_cache_misses_total", "Reads the cache of a with-cache storage could not answer.")
    public static let fallbackFetches = MetricInfo("casfs_fallback_fetches_total", "Whole blobs fetched from the fallback of a with-cache storage.")
    public static let fallbackFetchBytes = MetricInfo("casfs_fallback_fetch_bytes_total", "Bytes of whole blobs fetched from the fallback of a with-cache storage.")
    public static let fallbackStreams = MetricInfo("casfs_fallback_range_reads_total", "Large blobs read range by range from the fallback while the cache fills.")
    public static let cacheFillFailures = MetricInfo("casfs_cache_fill_failures_total", "Fetched blobs the cache could not keep.")
    public static let prefetchedBlobs = MetricInfo("casfs_prefetched_blobs_total", "Blobs brought into a cache ahead of their reads.")
    // Deferred fallback writes.
    public static let deferredQueued = MetricInfo("casfs_deferred_writes_queued", "Deferred fallback writes journaled and not yet sent.")
    public static let deferredOldestAge = MetricInfo("casfs_deferred_write_oldest_age_seconds", "Age of the oldest deferred fallback write not yet sent.")
    public static let deferredSent = MetricInfo("casfs_deferred_writes_sent_total", "Deferred fallback writes that reached the fallback.")
    public static let deferredFailures = MetricInfo("casfs_deferred_write_failures_total", "Attempts of deferred fallback writes that failed (each is retried).")
    public static let deferredRefused = MetricInfo("casfs_deferred_writes_refused_total", "Deferred fallback writes no longer sent because the fallback refused them for good.")
    public static let journalDamaged = MetricInfo("casfs_journal_damaged_entries_total", "Deferred-write journal entries refused (damaged bytes, links, wrong length) and moved aside.")
    // Replicated storages.
    public static let replicaRepairs = MetricInfo("casfs_replica_repairs_total", "Blobs copied to a replica that lacked them (read-repair and background replication).")
    public static let replicaRepairFailures = MetricInfo("casfs_replica_repair_failures_total", "Copies of blobs to a replica that lacked them that failed.")
    public static let replicaErrors = MetricInfo("casfs_replica_errors_total", "Calls to one replica that failed (the others were still used).")
    public static let replicationQueued = MetricInfo("casfs_replication_queued", "Blobs waiting to be copied to the replicas that lack them.")
    public static let replicationDropped = MetricInfo("casfs_replication_dropped_total", "Blobs not queued for background replication because the queue was full.")
    // Verification.
    public static let verifications = MetricInfo("casfs_verifications_total", "Blobs hashed in full to check them against their digest.")
    public static let verifiedBytes = MetricInfo("casfs_verified_bytes_total", "Bytes hashed to check blobs against their digests.")
    public static let verifyFailures = MetricInfo("casfs_verify_failures_total", "Blobs whose bytes did not match their digest.")
    public static let repairs = MetricInfo("casfs_corrupt_blobs_removed_total", "Corrupt blobs removed from their store.")
    // Media damage.
    public static let damagedCopiesReplaced = MetricInfo("casfs_damaged_copies_replaced_total", "Stored copies found different from the verified bytes of a write, and replaced by them.")
    public static let scrubObjects = MetricInfo("casfs_scrub_objects_checked_total", "Store files re-hashed by scrub.")
    public static let scrubBytes = MetricInfo("casfs_scrub_bytes_checked_total", "Bytes re-hashed by scrub.")
    public static let scrubDamaged = MetricInfo("casfs_scrub_damaged_total", "Store files scrub found damaged (bytes that do not hash to their name).")
    public static let scrubRepaired = MetricInfo("casfs_scrub_repaired_total", "Damaged store files scrub replaced with verified bytes from another storage.")
    public static let scrubRemoved = MetricInfo("casfs_scrub_removed_total", "Damaged store files scrub removed from their store and index.")
    public static let scrubPasses = MetricInfo("casfs_scrub_passes_total", "Scrub passes completed over a store.")
    public static let scrubPassStart = MetricInfo("casfs_scrub_last_pass_start_timestamp_seconds", "When the last completed scrub pass over a store started (Unix time; 0: none yet).")
    public static let scrubPassEnd = MetricInfo("casfs_scrub_last_pass_end_timestamp_seconds", "When the last completed scrub pass over a store ended (Unix time; 0: none yet).")
    // Writes.
    public static let writesStored = MetricInfo("casfs_writes_stored_total", "Verified writes stored.")
    public static let writesSkipped = MetricInfo("casfs_writes_skipped_total", "Verified writes of blobs already present (no-ops).")
    public static let writesRejected = MetricInfo("casfs_writes_rejected_total", "Writes whose bytes did not match their name.")
    // Memory.
    public static let memoryBytes = MetricInfo("casfs_memory_bytes", "Bytes of blobs a memory (LRU) storage holds: listed, being read in, or deleted and still read.")
    public static let memoryMaxBytes = MetricInfo("casfs_memory_max_bytes", "Capacity of a memory (LRU) storage.")
    public static let memoryBlobs = MetricInfo("casfs_memory_blobs", "Blobs held by a memory (LRU) storage.")
    // Redis index.
    public static let indexOrphans = MetricInfo("casfs_index_orphans_removed_total", "Index entries removed because their bytes were gone.")
    public static let indexEvictedBlobs = MetricInfo("casfs_index_evicted_blobs_total", "Blobs deleted by cleanup.")
    public static let indexEvictedBytes = MetricInfo("casfs_index_evicted_bytes_total", "Bytes deleted by cleanup.")
    public static let indexAdded = MetricInfo("casfs_index_blobs_added_total", "Blobs newly added to the index.")
    public static let indexRaces = MetricInfo("casfs_index_delete_races_total", "Deletes that met a concurrent re-add and kept the blob.")
    // Index health (configured and zero-config mounts check it periodically).
    public static let indexProblem = MetricInfo("casfs_index_problem", "1 while the index has this problem (kind: emptier_than_store, total_size_missing, evicting_policy), else 0.")
    public static let indexLossDetected = MetricInfo("casfs_index_loss_detected_total", "Times a check found the index lost (much emptier than its store, or total_size missing).")
    public static let indexReindexes = MetricInfo("casfs_index_background_reindexes_total", "Background passes that made the index agree with its store.")
    public static let redisConnections = MetricInfo("casfs_redis_connections", "Open connections to Redis.")
    public static let redisErrors = MetricInfo("casfs_redis_errors_total", "Failed attempts to reach Redis or run commands there (each failed retry counts), and error replies.")
    public static let redisRetries = MetricInfo("casfs_redis_retries_total", "Redis commands sent again after a failed attempt.")
    public static let redisReconnects = MetricInfo("casfs_redis_reconnects_total", "Connections to Redis made again after a failure.")
    // Access times.
    public static let accessFlushes = MetricInfo("casfs_access_time_flushes_total", "Batches of access-time refreshes sent to the index.")
    public static let accessTouched = MetricInfo("casfs_access_time_refreshes_total", "Blobs whose access time was refreshed.")
    public static let accessFailures = MetricInfo("casfs_access_time_failures_total", "Batches of access-time refreshes that failed.")
    // Remote CAS.
    public static let remoteErrors = MetricInfo("casfs_remote_rpc_errors_total", "Remote CAS calls that failed after their retries (a blob not found is an answer, not an error).")
    public static let remoteRetries = MetricInfo("casfs_remote_rpc_retries_total", "Remote CAS calls sent again after a failed attempt.")
    // FUSE.
    public static let fuseRequests = MetricInfo("casfs_fuse_requests_total", "Kernel requests served, by operation.")
    public static let fuseErrors = MetricInfo("casfs_fuse_errors_total", "Kernel requests answered with an error other than a plain miss.")
    public static let fuseDuration = MetricInfo("casfs_fuse_request_duration_seconds", "Time to answer a kernel request, by operation.")
    public static let readBytes = MetricInfo("casfs_read_bytes_total", "Bytes served to readers by the daemon.")
    public static let writeBytes = MetricInfo("casfs_write_bytes_total", "Bytes written through the mount.")
    public static let passthroughOpens = MetricInfo("casfs_passthrough_opens_total", "Opens handed to the kernel to read the store file directly.")
    public static let inodes = MetricInfo("casfs_inodes", "File inodes the kernel knows.")
    public static let treeInodes = MetricInfo("casfs_tree_inodes", "Directory and symlink inodes of trees the kernel knows.")
    // Trees.
    public static let treeCached = MetricInfo("casfs_tree_directories_cached", "Parsed Directory messages held.")
    public static let treeCachedBytes = MetricInfo("casfs_tree_directory_cache_bytes", "Bytes of Directory blobs behind the parsed messages held.")
    public static let treeHits = MetricInfo("casfs_tree_directory_hits_total", "Directory lookups answered by the parsed-message cache.")
    public static let treeLoads = MetricInfo("casfs_tree_directory_loads_total", "Directory blobs read and parsed.")
    // The cold path: existence answered from memory, blobs pushed into the page cache.
    public static let existenceHits = MetricInfo("casfs_existence_cache_hits_total", "Existence checks answered from memory (the blob was found present recently).")
    public static let existenceMisses = MetricInfo("casfs_existence_cache_misses_total", "Existence checks passed to the storage.")
    public static let pageStores = MetricInfo("casfs_page_stores_total", "Small blobs pushed into the kernel's page cache before any read of them reached the daemon (the store won the race).")
    public static let pageStoresLost = MetricInfo("casfs_page_stores_lost_total", "Reads that reached the daemon while their blob's push into the page cache was still queued (the reader won the race).")
    public static let pageStoresRefused = MetricInfo("casfs_page_stores_refused_total", "Pushes into the page cache the kernel refused (it did not hold the inode in time).")
    public static let pageStoresSkipped = MetricInfo("casfs_page_stores_skipped_total", "Pushes into the page cache not made (queue full, blob gone or unreadable).")
    public static let pageStoreBytes = MetricInfo("casfs_page_store_bytes_total", "Bytes pushed into the kernel's page cache.")
}
