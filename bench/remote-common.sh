# Shared helpers for the remote-CAS benchmarks (sourced after mount-common.sh).
# Starts a private Redis and a BuildGrid server (CAS + ByteStream over
# !redis-index on !disk-storage) on free loopback ports under $WORK.
VENV="${CASFS_BUILDGRID_VENV:-$ROOT_DIR/.build-venv/buildgrid}"
REAPI_CLIENT="$ROOT_DIR/Tests/python/reapi_client.py"

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_buildgrid() {
    [[ -x "$VENV/bin/bgd" ]] || "$ROOT_DIR/scripts/setup-buildgrid-venv" "$VENV" >&2
    local rport
    rport="$(free_port)"
    BG_PORT="$(free_port)"
    mkdir -p "$WORK/bg/store"
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK/bg" >"$WORK/bg/redis.log" 2>&1 &
    REDIS_PID=$!
    cat > "$WORK/bg/bgd.yaml" <<YAML
server:
  - !channel
    address: "127.0.0.1:$BG_PORT"
    insecure-mode: true
authorization:
  method: none
monitoring:
  enabled: false
connections:
  - !redis-connection &redis
    host: 127.0.0.1
    port: $rport
storages:
  - !disk-storage &disk
    path: $WORK/bg/store
  - !redis-index &cas
    storage: *disk
    redis: *redis
instances:
  - name: [""]
    services:
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
YAML
    "$VENV/bin/bgd" server start "$WORK/bg/bgd.yaml" >"$WORK/bg/bgd.log" 2>&1 &
    BG_PID=$!
    trap 'kill $BG_PID 2>/dev/null || true; cleanup' EXIT
    local i
    for i in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$BG_PORT") 2>/dev/null && return 0
        kill -0 "$BG_PID" 2>/dev/null || die "bgd exited: $(tail -20 "$WORK/bg/bgd.log")"
        sleep 0.1
    done
    die "BuildGrid did not start"
}

reapi() { "$VENV/bin/python" "$REAPI_CLIENT" --target "127.0.0.1:$BG_PORT" "$@"; }
