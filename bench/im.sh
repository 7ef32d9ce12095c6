#!/usr/bin/env bash
# Presence at scale and the conversation list (issue 8), end to end over TCP with
# bench/src/bin/imload.rs against a one-shard broker pinned to core 0 (imload on core 1).
# Each scenario runs RUNS times (default 3) on a fresh data dir; the RESULT lines of every run
# are printed, then the median of each figure.
#
#   bench/im.sh [presence|convlist|all]          # default all; ~3 min per presence run, ~10 min in all
#
# presence: 10,000 users, each subscribed to 100 of the others; 30 s idle, then 30 s with 1% of
#   the users flapping per second for each of: reconnect after 200 ms, reconnect after 1500 ms,
#   AWAY for 1500 ms; then the coalescing check (50 users drop at once, back after 200 ms, then
#   after 1500 ms). cpu_pct is the broker's CPU time over the phase in % of one core.
# convlist: 1,000 senders send one message each to `owner`; the owner's first page (limit 50
#   and 500) is timed 200 times against a Ping round trip, warm, then after a restart (first
#   request cold: its newest messages are read from the log), once per limit.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
RUNS=${RUNS:-3}
PORT=17600
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -p parley-broker --bin broker -p parley-bench --bin imload >&2
ulimit -n 20000
TMP=$(mktemp -d /tmp/bench-im.XXXXXX)
PID=
stop() { # SIGTERM the broker, SIGKILL after 30 s
  [ -n "$PID" ] || return 0
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=
}
trap 'stop; rm -rf "$TMP"' EXIT

start() { # $1: data dir; sets PID
  : >"$TMP/broker.log"
  taskset -c 0 "$TARGET/release/broker" serve --data-dir "$1" --tcp "127.0.0.1:$PORT" --no-ws --admin none \
    --set shards=1 --set storage.durability=never \
    --set limits.request_rate_per_sec=1000000 --set limits.request_burst=1000000 \
    --set limits.max_connections=30000 --set limits.max_unauthenticated=30000 \
    --set limits.max_unauthenticated_per_source=30000 >>"$TMP/broker.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do grep -q "parley listening" "$TMP/broker.log" && return 0; sleep 0.1; done
  echo "broker did not start:" >&2; cat "$TMP/broker.log" >&2; exit 1
}
imload() { taskset -c 1 "$TARGET/release/imload" "$@"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "commit: $(git rev-parse --short HEAD)"
OUT=$TMP/results
: >"$OUT"
for run in $(seq "$RUNS"); do
  if [ "$WHAT" = all ] || [ "$WHAT" = presence ]; then
    rm -rf "$TMP/data"; start "$TMP/data"
    imload presence --data-dir "$TMP/data" --addr "127.0.0.1:$PORT" --broker-pid "$PID" | tee -a "$OUT"
    grep -ci "panick" "$TMP/broker.log" >/dev/null && echo "broker log mentions a panic" >&2
    stop
  fi
  if [ "$WHAT" = all ] || [ "$WHAT" = convlist ]; then
    rm -rf "$TMP/data"; start "$TMP/data"
    imload convlist --data-dir "$TMP/data" --addr "127.0.0.1:$PORT" --phase fill | tee -a "$OUT"
    imload convlist --data-dir "$TMP/data" --addr "127.0.0.1:$PORT" --phase measure --label warm | tee -a "$OUT"
    for first in 50 500; do # restart, so that the page asked for first is read from the log
      stop; start "$TMP/data"
      other=$([ "$first" = 50 ] && echo 500 || echo 50)
      imload convlist --data-dir "$TMP/data" --addr "127.0.0.1:$PORT" --phase measure \
        --label "restart-$first" --limits "$first,$other" | tee -a "$OUT"
    done
    stop
  fi
done
echo "--- medians over $RUNS runs"
python3 - "$OUT" <<'EOF'
import sys, statistics
groups = {}
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "):
        continue
    kv = dict(f.split("=", 1) for f in line.split()[2:])
    key = (line.split()[1], kv.pop("label", ""), kv.pop("phase", ""))
    for k, v in kv.items():
        try:
            groups.setdefault(key, {}).setdefault(k, []).append(float(v))
        except ValueError:
            groups.setdefault(key, {}).setdefault(k, []).append(v)
for (scen, label, phase), kv in groups.items():
    parts = []
    for k, vs in kv.items():
        if all(isinstance(v, float) for v in vs):
            m = statistics.median(vs)
            parts.append(f"{k}={m:g}" + (f" [{'/'.join(f'{v:g}' for v in vs)}]" if len(vs) > 1 else ""))
        else:
            parts.append(f"{k}={'/'.join(vs)}")
    print(scen, label, phase, " ".join(parts))
EOF
