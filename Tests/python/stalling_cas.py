"""A REAPI CAS that stalls large ByteStream reads, for tests: it serves the
blobs in DIR (files named <hash>_<size>) through Capabilities,
FindMissingBlobs, BatchReadBlobs, BatchUpdateBlobs, ByteStream.Read and
ByteStream.Write, but a Read asking for more than --stall-above bytes (or
for the whole blob) gets no answer until the client gives up. With
--hang-reads, every BatchReadBlobs and Read gets no answer (a hung server
that still accepts connections). Built from BuildGrid's generated gRPC stubs.

Usage: python stalling_cas.py --dir DIR --port-file FILE [--stall-above N]
           [--hang-reads] [--max-batch N]
Prints nothing; writes the port it listens on (127.0.0.1) to FILE, one line
per Read to DIR/../reads.log: "<offset> <limit> served|stalled", and one
line per call to DIR/../calls.log:
  "GetCapabilities", "FindMissingBlobs <n>",
  "BatchReadBlobs <hash>_<size> ...", "BatchUpdateBlobs <hash>_<size> ...",
  "Read <hash>_<size> <offset> <limit> served|stalled", "Write <hash>_<size>".
--max-batch: the max_batch_total_size_bytes advertised (default 4 MiB).
"""

import argparse
import hashlib
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
CALLS_LOG = None


def record(path, line):
    with LOG_LOCK:
        with open(path, "a") as f:
            f.write(line + "\n")


def call(line):
    record(CALLS_LOG, line)


def name(digest):
    return "%s_%d" % (digest.hash, digest.size_bytes)


def blob_path(root, digest):
    return os.path.join(root, name(digest))


def hang(context):
    while context.is_active():
        time.sleep(0.05)


def store(root, blob_name, data):
    tmp = os.path.join(root, ".tmp-%d-%s" % (threading.get_ident(), blob_name))
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(root, blob_name))


class Capabilities(re_grpc.CapabilitiesServicer):
    def __init__(self, max_batch):
        self.max_batch = max_batch

    def GetCapabilities(self, request, context):
        call("GetCapabilities")
        caps = re.ServerCapabilities()
        caps.cache_capabilities.max_batch_total_size_bytes = self.max_batch
        caps.cache_capabilities.digest_functions.append(re.DigestFunction.SHA256)
        return caps


class CAS(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, root, hang_reads):
        self.root = root
        self.hang_reads = hang_reads

    def FindMissingBlobs(self, request, context):
        call("FindMissingBlobs %d" % len(request.blob_digests))
        out = re.FindMissingBlobsResponse()
        for d in request.blob_digests:
            if not os.path.exists(blob_path(self.root, d)):
                out.missing_blob_digests.append(d)
        return out

    def BatchReadBlobs(self, request, context):
        call("BatchReadBlobs " + " ".join(name(d) for d in request.digests))
        if self.hang_reads:
            hang(context)
            return re.BatchReadBlobsResponse()
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

    def BatchUpdateBlobs(self, request, context):
        call("BatchUpdateBlobs " + " ".join(name(r.digest) for r in request.requests))
        out = re.BatchUpdateBlobsResponse()
        for r in request.requests:
            resp = out.responses.add()
            resp.digest.CopyFrom(r.digest)
            if hashlib.sha256(r.data).hexdigest() != r.digest.hash or len(r.data) != r.digest.size_bytes:
                resp.status.CopyFrom(status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0]))
                continue
            store(self.root, name(r.digest), r.data)
            resp.status.CopyFrom(status_pb2.Status(code=0))
        return out


class ByteStream(bs_grpc.ByteStreamServicer):
    def __init__(self, root, stall_above, hang_reads, log):
        self.root = root
        self.stall_above = stall_above
        self.hang_reads = hang_reads
        self.log = log

    def record(self, line):
        record(self.log, line)

    def Read(self, request, context):
        parts = request.resource_name.split("/")
        i = parts.index("blobs")
        name = "%s_%s" % (parts[i + 1], parts[i + 2])
        p = os.path.join(self.root, name)
        if not os.path.exists(p):
            context.abort(grpc.StatusCode.NOT_FOUND, "no blob " + name)
        size = os.path.getsize(p)
        limit = request.read_limit if request.read_limit > 0 else size - request.read_offset
        if self.hang_reads or limit > self.stall_above:
            self.record("%d %d stalled" % (request.read_offset, limit))
            call("Read %s %d %d stalled" % (name, request.read_offset, limit))
            hang(context)
            return
        self.record("%d %d served" % (request.read_offset, limit))
        call("Read %s %d %d served" % (name, request.read_offset, limit))
        with open(p, "rb") as f:
            f.seek(request.read_offset)
            chunk = f.read(limit)
        for o in range(0, len(chunk), 1 << 20):
            yield bs.ReadResponse(data=chunk[o:o + (1 << 20)])

    def Write(self, request_iterator, context):
        resource = None
        data = bytearray()
        for req in request_iterator:
            if resource is None:
                resource = req.resource_name
            if req.write_offset != len(data):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "write_offset %d, have %d" % (req.write_offset, len(data)))
            data += req.data
            if req.finish_write:
                break
        parts = resource.split("/")
        i = parts.index("blobs")
        blob_name = "%s_%s" % (parts[i + 1], parts[i + 2])
        call("Write " + blob_name)
        if hashlib.sha256(data).hexdigest() != parts[i + 1] or len(data) != int(parts[i + 2]):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match " + blob_name)
        store(self.root, blob_name, bytes(data))
        return bs.WriteResponse(committed_size=len(data))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--stall-above", type=int, default=64 << 10)
    ap.add_argument("--hang-reads", action="store_true")
    ap.add_argument("--max-batch", type=int, default=4 << 20)
    args = ap.parse_args()
    global CALLS_LOG
    parent = os.path.dirname(os.path.abspath(args.dir))
    CALLS_LOG = os.path.join(parent, "calls.log")
    limit = max(4 << 20, args.max_batch + (1 << 20))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", limit)])
    re_grpc.add_CapabilitiesServicer_to_server(Capabilities(args.max_batch), server)
    re_grpc.add_ContentAddressableStorageServicer_to_server(CAS(args.dir, args.hang_reads), server)
    log = os.path.join(parent, "reads.log")
    bs_grpc.add_ByteStreamServicer_to_server(ByteStream(args.dir, args.stall_above, args.hang_reads, log), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(args.port_file + ".tmp", args.port_file)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
