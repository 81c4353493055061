"""A REAPI client built from BuildGrid's own generated gRPC stubs, so tests
and benchmarks can talk to a BuildGrid server without going through casfs.

Usage: python reapi_client.py --target HOST:PORT [--instance NAME] COMMAND ARGS
       python reapi_client.py --url URL [--server-cert PEM] [--client-key PEM
              --client-cert PEM] [--token-file FILE] [--instance NAME] COMMAND ARGS

--target opens a plaintext channel. --url goes through BuildGrid's own
setup_channel (the one its !remote-storage uses): https:// or grpcs:// mean
TLS, the token file is sent as "authorization: Bearer <token>".

Commands (digests are written "<hash>_<size>"):
  upload FILE...          BatchUpdateBlobs for files up to 2 MiB, ByteStream
                          Write otherwise; prints one digest per file
  upload-batch FILE...    BatchUpdateBlobs only, batches under 4 MiB; prints
                          the number of blobs stored
  missing DIGEST...       FindMissingBlobs; prints the missing digests
  read DIGEST OUT         ByteStream Read of the whole blob into OUT
  read-range DIGEST OFFSET LIMIT OUT
                          ByteStream Read with read_offset/read_limit
  capabilities            GetCapabilities; prints max_batch_total_size_bytes
                          and the supported compressors, one a line
"""

import argparse
import hashlib
import sys
import uuid

import grpc

from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildgrid._protos.google.bytestream import bytestream_pb2 as bs
from buildgrid._protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

CHUNK = 1 << 20
BATCH = (4 << 20) - (64 << 10)


def parse(text):
    h, s = text.rsplit("_", 1)
    return re.Digest(hash=h, size_bytes=int(s))


def name(d):
    return f"{d.hash}_{d.size_bytes}"


def prefix(instance):
    return f"{instance}/" if instance else ""


def main():
    ap = argparse.ArgumentParser()
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--target")
    where.add_argument("--url")
    ap.add_argument("--server-cert")
    ap.add_argument("--client-key")
    ap.add_argument("--client-cert")
    ap.add_argument("--token-file")
    ap.add_argument("--instance", default="")
    ap.add_argument("command")
    ap.add_argument("args", nargs="*")
    a = ap.parse_args()
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    if a.url:
        from buildgrid.server.client.channel import setup_channel
        channel, _ = setup_channel(a.url, auth_token=a.token_file, client_key=a.client_key,
                                   client_cert=a.client_cert, server_cert=a.server_cert)
    else:
        channel = grpc.insecure_channel(a.target, options=opts)
    cas = re_grpc.ContentAddressableStorageStub(channel)
    stream = bs_grpc.ByteStreamStub(channel)
    p = prefix(a.instance)

    if a.command == "upload":
        for path in a.args:
            data = open(path, "rb").read()
            d = re.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
            if len(data) <= 2 << 20:
                r = cas.BatchUpdateBlobs(re.BatchUpdateBlobsRequest(
                    instance_name=a.instance, requests=[re.BatchUpdateBlobsRequest.Request(digest=d, data=data)]))
                code = r.responses[0].status.code
                if code != 0:
                    sys.exit(f"BatchUpdateBlobs {name(d)}: code {code} {r.responses[0].status.message}")
            else:
                rn = f"{p}uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"

                def reqs():
                    for off in range(0, len(data), CHUNK):
                        part = data[off:off + CHUNK]
                        yield bs.WriteRequest(resource_name=rn if off == 0 else "", write_offset=off,
                                              data=part, finish_write=off + len(part) == len(data))
                r = stream.Write(reqs())
                if r.committed_size != len(data):
                    sys.exit(f"ByteStream Write {name(d)}: committed {r.committed_size}")
            print(name(d))
    elif a.command == "upload-batch":
        batch, size, n = [], 0, 0

        def flush():
            nonlocal batch, size, n
            if not batch:
                return
            r = cas.BatchUpdateBlobs(re.BatchUpdateBlobsRequest(instance_name=a.instance, requests=batch))
            for x in r.responses:
                if x.status.code != 0:
                    sys.exit(f"BatchUpdateBlobs {name(x.digest)}: code {x.status.code} {x.status.message}")
            n += len(batch)
            batch, size = [], 0

        for path in a.args:
            data = open(path, "rb").read()
            d = re.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
            if size + len(data) + 200 > BATCH:
                flush()
            batch.append(re.BatchUpdateBlobsRequest.Request(digest=d, data=data))
            size += len(data) + 200
        flush()
        print(n)
    elif a.command == "missing":
        r = cas.FindMissingBlobs(re.FindMissingBlobsRequest(
            instance_name=a.instance, blob_digests=[parse(x) for x in a.args]))
        for d in r.missing_blob_digests:
            print(name(d))
    elif a.command in ("read", "read-range"):
        d = parse(a.args[0])
        offset, limit = (int(a.args[1]), int(a.args[2])) if a.command == "read-range" else (0, 0)
        out = a.args[-1]
        rn = f"{p}blobs/{d.hash}/{d.size_bytes}"
        with open(out, "wb") as f:
            for r in stream.Read(bs.ReadRequest(resource_name=rn, read_offset=offset, read_limit=limit)):
                f.write(r.data)
    elif a.command == "capabilities":
        caps = re_grpc.CapabilitiesStub(channel).GetCapabilities(
            re.GetCapabilitiesRequest(instance_name=a.instance))
        print(caps.cache_capabilities.max_batch_total_size_bytes)
        for c in caps.cache_capabilities.supported_compressors:
            print(re.Compressor.Value.Name(c))
    else:
        sys.exit(f"unknown command {a.command}")


if __name__ == "__main__":
    main()
