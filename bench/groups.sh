#!/usr/bin/env bash
# The group targets of bench/RESULTS.md ("Groups, rooms, receipts, presence"): broker CPU per
# delivered group message for
#   fanout1000  a group of 1,000, all online, one publisher (`fanout --conversation group`);
#   m1000       a group of 1,000 members, all online (`groups`, no churn);
#   m100000     a group of 100,000 members, 1 % online (1,000: the same online count as m1000).
# Each runs against a fresh broker (one shard, pinned to core 0; loadgen on core 1), with the
# durability given (default `always`), RUNS times (default 3). Prints one JSON line per run
# (loadgen's --json report, which carries the broker's CPU from /proc).
#
#   bench/groups.sh [always|never] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
DURABILITY=${1:-always}
RUNS=${2:-3}
PORT=17720
cargo build --release -p parley-broker --bin broker -p parley-loadgen >&2
run() { # name, loadgen args...
  local name=$1; shift
  local dir; dir=$(mktemp -d /tmp/bench-groups.XXXXXX)
  taskset -c 0 target/release/broker serve --data-dir "$dir/data" --tcp "127.0.0.1:$PORT" --no-ws --admin none \
    --set shards=1 --set "storage.durability=$DURABILITY" --set groups.max_members=100000 \
    --set limits.request_rate_per_sec=10000000 --set limits.request_burst=10000000 \
    --set limits.max_connections=30000 --set limits.max_unauthenticated=30000 \
    --set limits.max_unauthenticated_per_source=30000 >"$dir/broker.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do grep -q "parley listening" "$dir/broker.log" 2>/dev/null && break; sleep 0.1; done
  local rc=0
  taskset -c 1 target/release/loadgen "$@" --system parley --addr "127.0.0.1:$PORT" \
    --data-dir "$dir/data" --broker-pid "$pid" --json >"$dir/run.json" 2>"$dir/loadgen.log" || rc=$?
  kill -TERM "$pid"; wait "$pid" || true
  printf '{"name":"%s","durability":"%s","rc":%s,"report":%s}\n' "$name" "$DURABILITY" "$rc" \
    "$(cat "$dir/run.json" 2>/dev/null || echo null)"
  rm -rf "$dir"
  sleep 1
}
for _ in $(seq "$RUNS"); do
  run fanout1000 fanout --conversation group --subscribers 999 --publishers 1 --window 64 \
    --body-bytes 100 --warmup 2 --duration 10
  run m1000 groups --groups 1 --members 1000 --online 1 --publishers 1 --churn 0 --window 64 \
    --body-bytes 100 --warmup 2 --duration 10
  run m100000 groups --groups 1 --members 100000 --online 0.01 --publishers 1 --churn 0 \
    --window 64 --body-bytes 100 --warmup 2 --duration 10
done
