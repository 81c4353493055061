"""A remote-execution client built from BuildGrid's own generated gRPC stubs:
uploads an input root, a Command and an Action, calls Execute and prints what
came back as JSON. Tests and benchmarks use it to drive `casfs worker`
through a real BuildGrid.

Usage: python execute_client.py --target HOST:PORT [--instance NAME] SPEC.json

SPEC (JSON):
  files:        {"path": "content" | {"content": "...", "executable": true}
                 | {"size": N, "seed": S}}   (random bytes; large files)
  symlinks:     {"path": "target"}
  directories:  ["path", ...]                 (empty directories)
  input_root:   "<hash>_<size>"               (instead of the above: an input
                                               root already in the CAS)
  arguments, env ({"NAME": "value"}), working_directory, output_files,
  output_directories, output_paths, platform ({"OSFamily": "linux"}),
  timeout (seconds), do_not_cache, skip_cache_lookup, salt,
  missing_input (true: a file's blob is left out of the CAS)

Output (JSON): status {code, message}, cached_result, exit_code, stdout,
stderr, output_files {path: {content, executable, digest}}, output_symlinks
{path: target}, output_file_symlinks, output_directory_symlinks,
output_directories {path: {tree_digest, root_directory_digest, files {relpath:
{content, executable}}, symlinks {relpath: target}, dirs [relpath...]}},
metadata {field: seconds since the epoch, worker}, action_digest, input_root,
seconds (wall time of the Execute call).
"""

import argparse
import hashlib
import json
import random
import sys
import time

import grpc

from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildgrid._protos.google.bytestream import bytestream_pb2 as bs
from buildgrid._protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

BATCH = (2 << 20)


def digest(data):
    return re.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def name(d):
    return f"{d.hash}_{d.size_bytes}"


class Client:
    def __init__(self, channel, instance):
        self.instance = instance
        self.cas = re_grpc.ContentAddressableStorageStub(channel)
        self.bs = bs_grpc.ByteStreamStub(channel)
        self.exe = re_grpc.ExecutionStub(channel)
        self.ac = re_grpc.ActionCacheStub(channel)

    def upload(self, blobs):
        """blobs: {hash_size: bytes}. Sends what FindMissingBlobs says is missing."""
        if not blobs:
            return
        ds = {k: digest(v) for k, v in blobs.items()}
        missing = self.cas.FindMissingBlobs(re.FindMissingBlobsRequest(
            instance_name=self.instance, blob_digests=list(ds.values()))).missing_blob_digests
        batch, size = [], 0
        for d in missing:
            data = blobs[name(d)]
            if len(data) > BATCH:
                self.write(d, data)
                continue
            if size + len(data) > BATCH and batch:
                self.send(batch)
                batch, size = [], 0
            batch.append(re.BatchUpdateBlobsRequest.Request(digest=d, data=data))
            size += len(data)
        if batch:
            self.send(batch)

    def send(self, batch):
        r = self.cas.BatchUpdateBlobs(re.BatchUpdateBlobsRequest(instance_name=self.instance, requests=batch))
        for x in r.responses:
            if x.status.code != 0:
                raise SystemExit(f"upload of {name(x.digest)} failed: {x.status.message}")

    def write(self, d, data):
        import uuid
        prefix = f"{self.instance}/" if self.instance else ""
        resource = f"{prefix}uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"

        def chunks():
            off = 0
            while True:
                piece = data[off:off + (1 << 20)]
                yield bs.WriteRequest(resource_name=resource if off == 0 else "", write_offset=off,
                                      data=piece, finish_write=off + len(piece) >= len(data))
                off += len(piece)
                if off >= len(data):
                    break
        self.bs.Write(chunks())

    def read(self, d):
        if d.size_bytes == 0:
            return b""
        prefix = f"{self.instance}/" if self.instance else ""
        out = bytearray()
        for r in self.bs.Read(bs.ReadRequest(resource_name=f"{prefix}blobs/{d.hash}/{d.size_bytes}")):
            out += r.data
        return bytes(out)


def build_tree(spec, blobs, leave_out):
    """The input root's Directory digest; every blob into `blobs`."""
    root = {"files": {}, "dirs": {}, "links": {}}

    def node(path, create=True):
        cur = root
        for part in [p for p in path.split("/") if p]:
            cur = cur["dirs"].setdefault(part, {"files": {}, "dirs": {}, "links": {}})
        return cur

    for path, v in spec.get("files", {}).items():
        if isinstance(v, str):
            data, exe = v.encode(), False
        elif "size" in v:
            rnd = random.Random(v.get("seed", 1))
            data, exe = rnd.randbytes(v["size"]), v.get("executable", False)
        else:
            data, exe = v["content"].encode(), v.get("executable", False)
        parent, _, base = path.rpartition("/")
        d = digest(data)
        if path not in leave_out:
            blobs[name(d)] = data
        node(parent)["files"][base] = (d, exe)
    for path, target in spec.get("symlinks", {}).items():
        parent, _, base = path.rpartition("/")
        node(parent)["links"][base] = target
    for path in spec.get("directories", []):
        node(path)

    def encode(n):
        msg = re.Directory()
        for k in sorted(n["files"]):
            d, exe = n["files"][k]
            msg.files.add(name=k, digest=d, is_executable=exe)
        for k in sorted(n["dirs"]):
            msg.directories.add(name=k, digest=encode(n["dirs"][k]))
        for k in sorted(n["links"]):
            msg.symlinks.add(name=k, target=n["links"][k])
        data = msg.SerializeToString(deterministic=True)
        d = digest(data)
        blobs[name(d)] = data
        return d

    return encode(root)


def ts(t):
    return t.seconds + t.nanos / 1e9 if (t.seconds or t.nanos) else None


def expand_tree(client, d):
    tree = re.Tree.FromString(client.read(d))
    by_digest = {name(digest(c.SerializeToString(deterministic=True))): c for c in tree.children}
    files, links, dirs = {}, {}, []

    def walk(directory, prefix):
        for f in directory.files:
            files[prefix + f.name] = {"content": client.read(f.digest).decode("utf-8", "replace"),
                                      "executable": f.is_executable}
        for s in directory.symlinks:
            links[prefix + s.name] = s.target
        for sub in directory.directories:
            dirs.append(prefix + sub.name)
            walk(by_digest[name(sub.digest)], prefix + sub.name + "/")
    walk(tree.root, "")
    return {"files": files, "symlinks": links, "dirs": dirs}


def describe(client, result):
    out = {
        "exit_code": result.exit_code,
        "stdout": client.read(result.stdout_digest).decode("utf-8", "replace") if result.HasField("stdout_digest") else result.stdout_raw.decode(),
        "stderr": client.read(result.stderr_digest).decode("utf-8", "replace") if result.HasField("stderr_digest") else result.stderr_raw.decode(),
        "output_files": {f.path: {"content": client.read(f.digest).decode("utf-8", "replace"),
                                  "executable": f.is_executable, "digest": name(f.digest)}
                         for f in result.output_files},
        "output_symlinks": {s.path: s.target for s in result.output_symlinks},
        "output_file_symlinks": {s.path: s.target for s in result.output_file_symlinks},
        "output_directory_symlinks": {s.path: s.target for s in result.output_directory_symlinks},
        "output_directories": {},
        "metadata": {},
    }
    for d in result.output_directories:
        entry = expand_tree(client, d.tree_digest)
        entry["tree_digest"] = name(d.tree_digest)
        entry["root_directory_digest"] = name(d.root_directory_digest)
        out["output_directories"][d.path] = entry
    m = result.execution_metadata
    out["metadata"]["worker"] = m.worker
    for f in ["queued_timestamp", "worker_start_timestamp", "worker_completed_timestamp",
              "input_fetch_start_timestamp", "input_fetch_completed_timestamp",
              "execution_start_timestamp", "execution_completed_timestamp",
              "output_upload_start_timestamp", "output_upload_completed_timestamp"]:
        out["metadata"][f] = ts(getattr(m, f))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--instance", default="")
    ap.add_argument("spec")
    args = ap.parse_args()
    spec = json.load(open(args.spec))
    channel = grpc.insecure_channel(args.target)
    client = Client(channel, args.instance)

    blobs = {}
    if "input_root" in spec:
        h, s = spec["input_root"].rsplit("_", 1)
        root = re.Digest(hash=h, size_bytes=int(s))
    else:
        root = build_tree(spec, blobs, set(spec.get("missing_input", [])))
    command = re.Command(arguments=spec["arguments"], working_directory=spec.get("working_directory", ""),
                         output_files=spec.get("output_files", []),
                         output_directories=spec.get("output_directories", []),
                         output_paths=spec.get("output_paths", []))
    for k in sorted(spec.get("env", {})):
        command.environment_variables.add(name=k, value=spec["env"][k])
    platform = spec.get("platform", {"OSFamily": "linux"})
    for k in sorted(platform):
        command.platform.properties.add(name=k, value=platform[k])
    cdata = command.SerializeToString(deterministic=True)
    blobs[name(digest(cdata))] = cdata
    action = re.Action(command_digest=digest(cdata), input_root_digest=root,
                       do_not_cache=spec.get("do_not_cache", False), salt=spec.get("salt", "").encode())
    for k in sorted(platform):
        action.platform.properties.add(name=k, value=platform[k])
    if "timeout" in spec:
        action.timeout.seconds = int(spec["timeout"])
    adata = action.SerializeToString(deterministic=True)
    blobs[name(digest(adata))] = adata
    client.upload(blobs)

    started = time.monotonic()
    request = re.ExecuteRequest(instance_name=args.instance, action_digest=digest(adata),
                                skip_cache_lookup=spec.get("skip_cache_lookup", False))
    last = None
    for op in client.exe.Execute(request, timeout=spec.get("call_timeout", 300)):
        last = op
        if op.done:
            break
    seconds = time.monotonic() - started
    if last is None or not last.done:
        raise SystemExit("Execute ended without a finished operation")
    out = {"action_digest": name(digest(adata)), "input_root": name(root), "seconds": seconds}
    if last.HasField("error"):
        out["status"] = {"code": last.error.code, "message": last.error.message}
        print(json.dumps(out))
        return
    response = re.ExecuteResponse()
    last.response.Unpack(response)
    out["status"] = {"code": response.status.code, "message": response.status.message}
    out["cached_result"] = response.cached_result
    out.update(describe(client, response.result))
    # What the action cache holds for the action now (None: nothing).
    try:
        cached = client.ac.GetActionResult(re.GetActionResultRequest(instance_name=args.instance,
                                                                     action_digest=digest(adata)))
        out["action_cache_exit_code"] = cached.exit_code
    except grpc.RpcError as e:
        out["action_cache_exit_code"] = None
        out["action_cache_error"] = str(e.code())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
