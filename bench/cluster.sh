#!/usr/bin/env bash
# The cluster's presence index (issue 10): two nodes on one Redis (a fresh redis-server on a free
# port, no persistence). bench/src/bin/imload/routes.rs logs clients in on node A while a watcher
# asks node B's admin API for their routes, then logs LOGINS clients in with WINDOW in flight.
# Each run (RUNS, default 3) starts fresh; the RESULT lines of every run are printed, then the
# median of each figure.
#
#   bench/cluster.sh            # ~1 min per run
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SAMPLES=${SAMPLES:-300}
LOGINS=${LOGINS:-10000}
WINDOW=${WINDOW:-500}
TARGET=${CARGO_TARGET_DIR:-target}
TOKEN=cluster-bench-token-0123456789
cargo build --release -p parley-broker --bin broker -p parley-bench --bin imload >&2
ulimit -n 20000
TMP=$(mktemp -d /tmp/bench-cluster.XXXXXX)
PIDS=()
stop_all() { # SIGTERM what this script started, SIGKILL after 30 s
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
}
trap 'stop_all; rm -rf "$TMP"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

node() { # $1: node id, $2: tcp port, $3: admin port
  "$TARGET/release/broker" serve --data-dir "$TMP/$1" --tcp "127.0.0.1:$2" --no-ws --admin "127.0.0.1:$3" \
    --cluster "redis://127.0.0.1:$REDIS_PORT" --node-id "$1" --advertise "127.0.0.1:$2" \
    --set "admin.token=\"$TOKEN\"" --set storage.durability=never \
    --set limits.max_connections=30000 --set limits.max_unauthenticated=30000 \
    --set limits.max_unauthenticated_per_source=30000 >"$TMP/$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do grep -q "parley listening" "$TMP/$1.log" && return 0; sleep 0.1; done
  echo "node $1 did not start:" >&2; cat "$TMP/$1.log" >&2; exit 1
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "commit: $(git rev-parse --short HEAD); $(redis-server --version | cut -d' ' -f1-3)"
OUT=$TMP/results
: >"$OUT"
for run in $(seq "$RUNS"); do
  rm -rf "$TMP/a" "$TMP/b"
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" >"$TMP/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  A_TCP=$(free_port); A_ADMIN=$(free_port); B_TCP=$(free_port); B_ADMIN=$(free_port)
  node a "$A_TCP" "$A_ADMIN"
  node b "$B_TCP" "$B_ADMIN"
  "$TARGET/release/imload" routes --data-dir "$TMP/a" --addr "127.0.0.1:$A_TCP" \
    --watch-admin "127.0.0.1:$B_ADMIN" --admin-token "$TOKEN" --redis "127.0.0.1:$REDIS_PORT" \
    --samples "$SAMPLES" --logins "$LOGINS" --window "$WINDOW" | tee -a "$OUT"
  grep -ci "panick" "$TMP/a.log" "$TMP/b.log" >/dev/null && echo "a node's log mentions a panic" >&2
  stop_all
done
echo "--- medians over $RUNS runs"
python3 bench/medians.py "$OUT"
