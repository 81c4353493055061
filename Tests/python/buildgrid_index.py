"""Drives BuildGrid's own RedisIndex over BuildGrid's DiskStorage.

Usage: python buildgrid_index.py --host H --port P --disk DIR [--prefix X] [--password PW] [--db N]
Reads a JSON list of operations on stdin, prints a JSON list of results.
Digests are written "<hash>_<size>"; blob bytes are hex strings.
"""

import argparse
import io
import json
import sys
from datetime import datetime, timezone

from buildgrid._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Digest
from buildgrid.server.cas.storage.disk import DiskStorage
from buildgrid.server.cas.storage.index.redis import RedisIndex
from buildgrid.server.redis.provider import RedisProvider


def digest(text):
    h, s = text.rsplit("_", 1)
    return Digest(hash=h, size_bytes=int(s))


def name(d):
    return f"{d.hash}_{d.size_bytes}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--disk", required=True)
    ap.add_argument("--prefix", default=None)
    ap.add_argument("--password", default=None)
    ap.add_argument("--db", type=int, default=None)
    args = ap.parse_args()

    provider = RedisProvider(host=args.host, port=args.port, password=args.password, db=args.db)
    index = RedisIndex(provider, DiskStorage(args.disk), prefix=args.prefix)
    index.start()

    results = []
    for op, *params in json.load(sys.stdin):
        if op == "has_blob":
            results.append(index.has_blob(digest(params[0])))
        elif op == "missing_blobs":
            results.append([name(d) for d in index.missing_blobs([digest(p) for p in params[0]])])
        elif op == "get_blob":
            f = index.get_blob(digest(params[0]))
            results.append(None if f is None else f.read().hex())
        elif op == "commit_write":
            index.commit_write(digest(params[0]), io.BytesIO(bytes.fromhex(params[1])))
            results.append(None)
        elif op == "bulk_update_blobs":
            statuses = index.bulk_update_blobs([(digest(d), bytes.fromhex(b)) for d, b in params[0]])
            results.append([s.code for s in statuses])
        elif op == "bulk_read_blobs":
            got = index.bulk_read_blobs([digest(p) for p in params[0]])
            results.append({h: v.hex() for h, v in got.items()})
        elif op == "delete_blob":
            index.delete_blob(digest(params[0]))
            results.append(None)
        elif op == "bulk_delete":
            results.append(index.bulk_delete([digest(p) for p in params[0]]))
        elif op == "total_size":
            results.append(index.get_total_size())
        elif op == "blob_count":
            results.append(index.get_blob_count())
        elif op == "delete_n_bytes":
            n, dry_run, protect = params
            after = None if protect is None else datetime.fromtimestamp(protect, timezone.utc)
            results.append(index.delete_n_bytes(n, dry_run=dry_run, protect_blobs_after=after))
        else:
            raise SystemExit(f"unknown operation {op!r}")
    index.stop()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
