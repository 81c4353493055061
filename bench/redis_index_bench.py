"""BuildGrid side of bench/redis-index: BuildGrid's RedisIndex over its in-memory
LRU storage, on the Redis given by --host/--port.

Reads commands on stdin, one per line, and answers each with one JSON line:
  run <seed>   FLUSHDB, index 5,000 blobs (untimed), call each operation once
               untimed (warm-up, as the casfs side does), then time missing_blobs over
               10,000 digests (half present) and bulk_update_blobs of 1,000 fresh
               100-byte blobs; prints {"missing_blobs": s, "bulk_update_blobs": s}
  quit
"""

import argparse
import hashlib
import json
import random
import sys
import time

from buildgrid._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Digest
from buildgrid.server.cas.storage.index.redis import RedisIndex
from buildgrid.server.cas.storage.lru_memory_cache import LRUMemoryCache
from buildgrid.server.redis.provider import RedisProvider


def blobs(rng, count, size):
    out = []
    for _ in range(count):
        data = rng.randbytes(size)
        out.append((Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=size), data))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--present", type=int, default=5000)
    ap.add_argument("--absent", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--blob-size", type=int, default=100)
    args = ap.parse_args()

    provider = RedisProvider(host=args.host, port=args.port)
    index = RedisIndex(provider, LRUMemoryCache(1 << 30))
    index.start()

    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        rng = random.Random(int(words[1]) * 7919 + 1)
        provider.execute_rw(lambda r: r.flushdb())
        present = blobs(rng, args.present, args.blob_size)
        index.bulk_update_blobs(present)
        absent = [d for d, _ in blobs(rng, args.absent, args.blob_size)]
        asked = [d for d, _ in present] + absent
        rng.shuffle(asked)
        warm = blobs(rng, args.batch, args.blob_size)
        fresh = blobs(rng, args.batch, args.blob_size)

        # Untimed warm-up, the same as the casfs side: one call of each operation.
        if len(index.missing_blobs(asked)) != len(absent):
            raise SystemExit("unexpected missing_blobs result in warm-up")
        if any(s.code != 0 for s in index.bulk_update_blobs(warm)):
            raise SystemExit("bulk_update_blobs failed in warm-up")

        t0 = time.perf_counter()
        missing = index.missing_blobs(asked)
        t1 = time.perf_counter()
        statuses = index.bulk_update_blobs(fresh)
        t2 = time.perf_counter()

        if len(missing) != len(absent) or any(s.code != 0 for s in statuses):
            raise SystemExit(f"unexpected results: {len(missing)} missing, statuses {set(s.code for s in statuses)}")
        print(json.dumps({"missing_blobs": t1 - t0, "bulk_update_blobs": t2 - t1}), flush=True)
    index.stop()


if __name__ == "__main__":
    main()
