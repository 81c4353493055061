# Used by scripts/check-proto-wire: see there.
import sys
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re
from buildgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2 as b, worker_pb2 as w
from buildgrid._protos.google.longrunning import operations_pb2 as op
from google.protobuf import text_format
d=re.Digest(hash='ab'*32,size_bytes=12)
a=re.Action(command_digest=d,input_root_digest=d,do_not_cache=True,salt=b'x',platform=re.Platform(properties=[re.Platform.Property(name='OSFamily',value='linux')]))
a.timeout.seconds=5
c=re.Command(arguments=['a','b'],environment_variables=[re.Command.EnvironmentVariable(name='A',value='1')],output_files=['o'],output_directories=['d'],output_paths=['p'],working_directory='w',output_node_properties=['mtime'],output_directory_format=2)
md=re.ExecutedActionMetadata(worker='me')
for f in ['queued_timestamp','worker_start_timestamp','worker_completed_timestamp','input_fetch_start_timestamp','input_fetch_completed_timestamp','execution_start_timestamp','execution_completed_timestamp','output_upload_start_timestamp','output_upload_completed_timestamp']:
    getattr(md,f).seconds=hash(f)%1000+1
md.virtual_execution_duration.seconds=3
r=re.ActionResult(output_files=[re.OutputFile(path='o',digest=d,is_executable=True,contents=b'c')],output_file_symlinks=[re.OutputSymlink(path='s',target='t')],output_symlinks=[re.OutputSymlink(path='s2',target='t2')],output_directories=[re.OutputDirectory(path='d',tree_digest=d,is_topologically_sorted=True,root_directory_digest=d)],output_directory_symlinks=[re.OutputSymlink(path='s3',target='t3')],exit_code=3,stdout_raw=b'o',stdout_digest=d,stderr_raw=b'e',stderr_digest=d,execution_metadata=md)
t=re.Tree(root=re.Directory(files=[re.FileNode(name='f',digest=d,is_executable=True)]),children=[re.Directory(symlinks=[re.SymlinkNode(name='l',target='x')])])
l=b.Lease(id='main/job',state=b.COMPLETED,assignment='as',status={'code':3,'message':'m'},requirements=w.Worker(properties=[w.Worker.Property(key='k',value='v')]))
l.payload.Pack(a); l.result.Pack(r); l.expire_time.seconds=9; l.inline_assignment.Pack(d)
s=b.BotSession(name='n',bot_id='id',status=b.BOT_TERMINATING,version='7',worker=w.Worker(devices=[w.Device(handle='h',properties=[w.Device.Property(key='a',value='b')])],properties=[w.Worker.Property(key='OSFamily',value='linux')],configs=[w.Worker.Config(key='capacity',value='2')]),leases=[l])
s.expire_time.seconds=4
ur=b.UpdateBotSessionRequest(name='n',bot_session=s); ur.update_mask.paths.append('leases')
cr=b.CreateBotSessionRequest(parent='main',bot_session=s)
er=re.ExecuteRequest(instance_name='main',skip_cache_lookup=True,action_digest=d)
eresp=re.ExecuteResponse(result=r,cached_result=True,status={'code':4,'message':'x'},message='mm')
meta=re.ExecuteOperationMetadata(stage=3,action_digest=d,stdout_stream_name='so',stderr_stream_name='se',partial_execution_metadata=md)
o=op.Operation(name='op',done=True); o.metadata.Pack(meta); o.response.Pack(eresp)
g=re.GetActionResultRequest(instance_name='i',action_digest=d,inline_stdout=True,inline_stderr=True,inline_output_files=['x'])
items=[('build.bazel.remote.execution.v2.Action',a),('build.bazel.remote.execution.v2.Command',c),('build.bazel.remote.execution.v2.ActionResult',r),('build.bazel.remote.execution.v2.Tree',t),('google.devtools.remoteworkers.v1test2.UpdateBotSessionRequest',ur),('google.devtools.remoteworkers.v1test2.CreateBotSessionRequest',cr),('build.bazel.remote.execution.v2.ExecuteRequest',er),('google.longrunning.Operation',o),('build.bazel.remote.execution.v2.GetActionResultRequest',g),('build.bazel.remote.execution.v2.ExecuteOperationMetadata',meta),('build.bazel.remote.execution.v2.ExecuteResponse',eresp)]
import subprocess
bad=0
for name,m in items:
    out=subprocess.run(['protoc','-I',sys.argv[1],'--decode',name]+sys.argv[2:],input=m.SerializeToString(),capture_output=True)
    # re-encode from text with protoc and compare bytes
    enc=subprocess.run(['protoc','-I',sys.argv[1],'--encode',name]+sys.argv[2:],input=out.stdout,capture_output=True)
    m2=type(m)(); m2.ParseFromString(enc.stdout)

    ok = m2==m and out.returncode==0 and not any(line.strip()[:1].isdigit() for line in out.stdout.decode().splitlines())
    print(name, 'OK' if ok else 'MISMATCH'); bad+= not ok
    if not ok: print(out.stdout.decode(), out.stderr.decode())
sys.exit(bad)
