"""A REAPI CAS that stalls large ByteStream reads, for tests: it serves the
blobs in DIR (files named <hash>_<size>) through Capabilities,
FindMissingBlobs, BatchReadBlobs and ByteStream.Read, but a Read asking for
more than --stall-above bytes (or for the whole blob) gets no answer until
the client gives up. Built from BuildGrid's generated gRPC stubs.

Usage: python stalling_cas.py --dir DIR --port-file FILE [--stall-above N]
Prints nothing; writes the port it listens on (127.0.0.1) to FILE, and one
line per Read to DIR/../reads.log: "<offset> <limit> served|stalled".
"""

import argparse
import os
import threading
import time
from concurrent import futures

import grpc

from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildgrid._protos.google.bytestream import bytestream_pb2 as bs
from buildgrid._protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildgrid._protos.google.rpc import status_pb2

LOG_LOCK = threading.Lock()


def blob_path(root, digest):
    return os.path.join(root, "%s_%d" % (digest.hash, digest.size_bytes))


class Capabilities(re_grpc.CapabilitiesServicer):
    def GetCapabilities(self, request, context):
        caps = re.ServerCapabilities()
        caps.cache_capabilities.max_batch_total_size_bytes = 4 << 20
        caps.cache_capabilities.digest_functions.append(re.DigestFunction.SHA256)
        return caps


class CAS(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, root):
        self.root = root

    def FindMissingBlobs(self, request, context):
        out = re.FindMissingBlobsResponse()
        for d in request.blob_digests:
            if not os.path.exists(blob_path(self.root, d)):
                out.missing_blob_digests.append(d)
        return out

    def BatchReadBlobs(self, request, context):
        out = re.BatchReadBlobsResponse()
        for d in request.digests:
            r = out.responses.add()
            r.digest.CopyFrom(d)
            p = blob_path(self.root, d)
            if os.path.exists(p):
                r.data = open(p, "rb").read()
                r.status.CopyFrom(status_pb2.Status(code=0))
            else:
                r.status.CopyFrom(status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0]))
        return out


class ByteStream(bs_grpc.ByteStreamServicer):
    def __init__(self, root, stall_above, log):
        self.root = root
        self.stall_above = stall_above
        self.log = log

    def record(self, line):
        with LOG_LOCK:
            with open(self.log, "a") as f:
                f.write(line + "\n")

    def Read(self, request, context):
        parts = request.resource_name.split("/")
        i = parts.index("blobs")
        name = "%s_%s" % (parts[i + 1], parts[i + 2])
        p = os.path.join(self.root, name)
        if not os.path.exists(p):
            context.abort(grpc.StatusCode.NOT_FOUND, "no blob " + name)
        size = os.path.getsize(p)
        limit = request.read_limit if request.read_limit > 0 else size - request.read_offset
        if limit > self.stall_above:
            self.record("%d %d stalled" % (request.read_offset, limit))
            while context.is_active():
                time.sleep(0.05)
            return
        self.record("%d %d served" % (request.read_offset, limit))
        with open(p, "rb") as f:
            f.seek(request.read_offset)
            chunk = f.read(limit)
        for o in range(0, len(chunk), 1 << 20):
            yield bs.ReadResponse(data=chunk[o:o + (1 << 20)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--stall-above", type=int, default=64 << 10)
    args = ap.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    re_grpc.add_CapabilitiesServicer_to_server(Capabilities(), server)
    re_grpc.add_ContentAddressableStorageServicer_to_server(CAS(args.dir), server)
    log = os.path.join(os.path.dirname(os.path.abspath(args.dir)), "reads.log")
    bs_grpc.add_ByteStreamServicer_to_server(ByteStream(args.dir, args.stall_above, log), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(args.port_file + ".tmp", args.port_file)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
