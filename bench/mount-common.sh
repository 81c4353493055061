# Shared helpers for the mount benchmarks (sourced, not run).
set -euo pipefail

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CASFS="${CASFS:-}"

die() { echo "error: $*" >&2; exit 1; }

build_casfs() {
    if [[ -z "$CASFS" ]]; then
        echo "building casfs (release)..." >&2
        (cd "$ROOT_DIR" && swift build -c release --scratch-path "${SCRATCH:-.build-bench}" --product casfs >&2)
        CASFS="$ROOT_DIR/${SCRATCH:-.build-bench}/release/casfs"
    fi
    [[ -x "$CASFS" ]] || die "casfs binary not found at $CASFS"
    [[ -e /dev/fuse ]] || die "/dev/fuse is missing"
}

# A scratch directory removed on exit (after unmounting anything under it).
make_workdir() {
    WORK="$(mktemp -d "${BENCH_TMP:-/var/tmp}/casfs-bench.XXXXXX")"
    trap cleanup EXIT
    [[ -n "${KEEP_WORK:-}" ]] && trap - EXIT || true
}

cleanup() {
    local mp
    for mp in "${MOUNTS[@]:-}"; do
        [[ -n "$mp" ]] && { fusermount3 -u "$mp" 2>/dev/null || fusermount3 -uz "$mp" 2>/dev/null || true; }
    done
    [[ -n "${REDIS_PID:-}" ]] && kill "$REDIS_PID" 2>/dev/null || true
    [[ -n "${WORK:-}" ]] && rm -rf "$WORK"
}

MOUNTS=()
DAEMON_PID=""

# mount_casfs CONFIG MOUNTPOINT [-o opts]: foreground daemon in the background; sets DAEMON_PID.
mount_casfs() {
    local config="$1" mp="$2"; shift 2
    mkdir -p "$mp" "$WORK/staging"
    "$CASFS" mount --foreground --config "$config" --staging-dir "$WORK/staging" "$@" "$mp" 2>>"$WORK/casfs.log" &
    DAEMON_PID=$!
    MOUNTS+=("$mp")
    local i
    for i in $(seq 600); do
        grep -q " $mp fuse" /proc/mounts && ls "$mp" >/dev/null && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || die "casfs exited; log: $(cat "$WORK/casfs.log")"
        sleep 0.05
    done
    die "mount did not come up"
}

unmount_casfs() {
    local mp="$1"
    fusermount3 -u "$mp"
    wait "$DAEMON_PID" 2>/dev/null || true
}

# place_blob STORE FILE: copies FILE into the disk store layout; prints <hash>_<size>.
place_blob() {
    local store="$1" file="$2" hash size
    hash="$(sha256sum "$file" | cut -c1-64)"
    size="$(stat -c %s "$file")"
    mkdir -p "$store/cas/objects/${hash:0:2}"
    cp "$file" "$store/cas/objects/${hash:0:2}/${hash:2}"
    echo "${hash}_${size}"
}

# Seconds (float) taken by a command.
time_cmd() {
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo "scale=6; ($t1 - $t0) / 1000000000" | bc
}

# Drops the page cache of one file (works on FUSE files too).
drop_file_cache() { dd if="$1" iflag=nocache count=0 status=none; }

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
