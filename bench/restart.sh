#!/usr/bin/env bash
# Start-up time of the broker against the size of its log: fills a one-shard data dir to each
# size with loadgen (pairs, 100-B bodies, durability `never` to fill fast), then measures the
# time from `broker serve` to its "parley listening" line (the listeners are bound only once the
# shard has rebuilt its state), after a clean stop (SIGTERM) and after `kill -9` in mid-load.
#
#   [DURABILITY=always] bench/restart.sh [SIZES_GIB...]   # default: never; sizes 1 4
#
# Needs free disk for the largest size; the data dir lives in a temp dir that is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("$@"); [ ${#SIZES[@]} -gt 0 ] || SIZES=(1 4)
PORT=17440
cargo build --release -p parley-broker -p parley-loadgen >&2
DIR=$(mktemp -d /tmp/bench-restart.XXXXXX)
PID=
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$DIR"' EXIT

MS=0
start() { # sets MS to the ms until listening, PID to the broker
  local t0 t1
  t0=$(date +%s%N)
  target/release/broker serve --data-dir "$DIR/data" --tcp "127.0.0.1:$PORT" --no-ws --admin none --set shards=1 \
    --set "storage.durability=${DURABILITY:-never}" --set limits.request_rate_per_sec=10000000 \
    --set limits.request_burst=10000000 >"$DIR/broker.log" 2>&1 &
  PID=$!
  for _ in $(seq 6000); do grep -q "parley listening" "$DIR/broker.log" 2>/dev/null && break; sleep 0.005; done
  t1=$(date +%s%N)
  MS=$(((t1 - t0) / 1000000))
}
log_bytes() { du -sb "$DIR/data/shard-0" | cut -f1; }

for gib in "${SIZES[@]}"; do
  want=$((gib * 1024 * 1024 * 1024))
  start
  while [ "$(log_bytes)" -lt "$want" ]; do
    target/release/loadgen pairs --system parley --addr "127.0.0.1:$PORT" --data-dir "$DIR/data" \
      --conns 200 --window 64 --body-bytes 100 --duration 10 >/dev/null 2>&1 || true
  done
  kill -TERM "$PID"; wait "$PID" || true
  clean=()
  for _ in 1 2 3; do
    start; clean+=("$MS"); kill -TERM "$PID"; wait "$PID" || true
  done
  crash=()
  for _ in 1 2 3; do
    start
    target/release/loadgen pairs --system parley --addr "127.0.0.1:$PORT" --data-dir "$DIR/data" \
      --conns 200 --window 64 --body-bytes 100 --duration 3 >/dev/null 2>&1 &
    LG=$!
    sleep 2; kill -9 "$PID"; wait "$PID" 2>/dev/null || true; wait "$LG" 2>/dev/null || true
    start; crash+=("$MS"); grep 'ready in' "$DIR/broker.log" | sed 's/^/  after kill -9: /' || true
    kill -TERM "$PID"; wait "$PID" || true
  done
  echo "log $(($(log_bytes) / 1048576)) MiB: start after a clean stop ${clean[*]} ms; after kill -9 ${crash[*]} ms"
  echo "  the last start said: $(grep 'ready in' "$DIR/broker.log" || true)"
done
PID=
