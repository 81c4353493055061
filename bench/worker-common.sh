# Shared helpers for the worker benchmarks (sourced after mount-common.sh):
# a private PostgreSQL cluster and a BuildGrid with CAS, ByteStream,
# ActionCache and Execution (+ Bots) on free loopback ports under $WORK, and
# `casfs worker` started with a fresh (cold) cache directory.
VENV="${CASFS_BUILDGRID_VENV:-$ROOT_DIR/.build-venv/buildgrid}"
EXECUTE_CLIENT="$ROOT_DIR/Tests/python/execute_client.py"
INSTANCE=main

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The release binary, built under the shared build lock unless CASFS is set.
build_casfs_locked() {
    if [[ -z "$CASFS" ]]; then
        echo "building casfs (release)..." >&2
        (cd "$ROOT_DIR" && flock /work/.swift-build.lock swift build -c release --scratch-path "${SCRATCH:-.build-bench}" --product casfs >&2 \
            || swift build -c release --scratch-path "${SCRATCH:-.build-bench}" --product casfs >&2)
        CASFS="$ROOT_DIR/${SCRATCH:-.build-bench}/release/casfs"
    fi
    [[ -x "$CASFS" ]] || die "casfs binary not found at $CASFS"
}

start_execution_grid() {
    [[ -x "$VENV/bin/bgd" ]] || "$ROOT_DIR/scripts/setup-buildgrid-venv" "$VENV" >&2
    local pgbin pgport
    pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
    [[ -x "$pgbin/initdb" ]] || die "PostgreSQL is not installed (scripts/install-deps)"
    pgport="$(free_port)"
    BG_PORT="$(free_port)"
    PGDIR="$(mktemp -d /tmp/casfs-bench-pg.XXXXXX)"
    chown postgres: "$PGDIR"
    runuser -u postgres -- "$pgbin/initdb" -D "$PGDIR/data" -A trust -U bgd >"$PGDIR/initdb.log" 2>&1 || die "initdb failed"
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$PGDIR/data" -w -l "$PGDIR/pg.log" \
        -o "-p $pgport -k $PGDIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200" start >/dev/null
    PG_STOP="runuser -u postgres -- $pgbin/pg_ctl -D $PGDIR/data -m fast -w stop"
    "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U bgd -d postgres -q -c 'create database bgd'
    local url="postgresql://bgd@127.0.0.1:$pgport/bgd"
    if "$VENV/bin/python" -c 'import psycopg' 2>/dev/null && ! "$VENV/bin/python" -c 'import psycopg2' 2>/dev/null; then
        url="postgresql+psycopg://bgd@127.0.0.1:$pgport/bgd"
    fi
    "$VENV/bin/bgd" migrate apply "$url" >/dev/null 2>&1 || die "bgd migrate apply failed"
    mkdir -p "$WORK/bg/store"
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
  - !sql-connection &sql
    connection-string: $url
    pool-size: 10
    max-overflow: 10
storages:
  - !disk-storage &disk
    path: $WORK/bg/store
caches:
  - !lru-action-cache &cache
    storage: *disk
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: false
schedulers:
  - !sql-scheduler &scheduler
    sql: *sql
    storage: *disk
    action-cache: *cache
    bot-session-keepalive-timeout: 60
    poll-interval: 0.1
    bot-poll-interval: 0.1
    # The default assigner runs every 1-2 s, which an idle bot waits for
    # with every action.
    assigners:
      - !priority-age-assigner
        interval: 0.05
        jitter-factor: 0.1
instances:
  - name: "$INSTANCE"
    services:
      - !cas
        storage: *disk
      - !bytestream
        storage: *disk
      - !action-cache
        cache: *cache
      - !execution
        scheduler: *scheduler
        bots-long-poll-during-execution: true
YAML
    "$VENV/bin/bgd" server start "$WORK/bg/bgd.yaml" >"$WORK/bg/bgd.log" 2>&1 &
    BG_PID=$!
    trap 'stop_worker; kill $BG_PID 2>/dev/null || true; wait $BG_PID 2>/dev/null || true; $PG_STOP >/dev/null 2>&1 || true; rm -rf "$PGDIR"; cleanup' EXIT
    local i
    for i in $(seq 900); do
        (exec 3<>"/dev/tcp/127.0.0.1/$BG_PORT") 2>/dev/null && return 0
        kill -0 "$BG_PID" 2>/dev/null || die "bgd exited: $(tail -20 "$WORK/bg/bgd.log")"
        sleep 0.1
    done
    die "BuildGrid did not start"
}

WORKER_PID=""
# start_worker NAME [casfs worker options...]: a worker with an empty cache directory.
start_worker() {
    local name="$1"; shift
    rm -rf "$WORK/w-$name"
    mkdir -p "$WORK/w-$name"
    "$CASFS" worker --server "grpc://127.0.0.1:$BG_PORT" --instance-name "$INSTANCE" --cache-dir "$WORK/w-$name/cache" "$@" \
        >"$WORK/w-$name/log" 2>&1 &
    WORKER_PID=$!
    local i
    for i in $(seq 600); do
        grep -q "bot session .* created" "$WORK/w-$name/log" && return 0
        kill -0 "$WORKER_PID" 2>/dev/null || die "casfs worker exited: $(tail -20 "$WORK/w-$name/log")"
        sleep 0.05
    done
    die "casfs worker started no bot session"
}

stop_worker() {
    [[ -n "$WORKER_PID" ]] || return 0
    kill -TERM "$WORKER_PID" 2>/dev/null || true
    wait "$WORKER_PID" 2>/dev/null || true
    WORKER_PID=""
}

execute_spec() { "$VENV/bin/python" "$EXECUTE_CLIENT" --target "127.0.0.1:$BG_PORT" --instance "$INSTANCE" "$1"; }
