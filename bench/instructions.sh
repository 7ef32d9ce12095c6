#!/usr/bin/env bash
# Broker CPU work per delivered message, counted in instructions by callgrind: repeatable on a
# shared, noisy machine (instruction counts do not depend on what else runs), unlike seconds.
#
#   bench/instructions.sh [BROKER_BINARY] [DURABILITY] [WINDOW]
#
# Starts the broker (one shard, default target/release/broker, durability `never`) under
# `valgrind --tool=callgrind`, runs loadgen pairs (100 clients, window 64, 100-B bodies, 8 s)
# against it, stops it with SIGINT, and prints the user-space instructions per delivered message
# (start-up and shutdown included; kernel work is not counted) and the top functions.
set -euo pipefail
cd "$(dirname "$0")/.."
BROKER=${1:-target/release/broker}
DURABILITY=${2:-never}
WINDOW=${3:-64}
PORT=17420
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install -y valgrind)" >&2; exit 2; }
cargo build --release -p parley-loadgen >&2
DIR=$(mktemp -d /tmp/bench-instr.XXXXXX)
valgrind --tool=callgrind --callgrind-out-file="$DIR/cg.out" "$BROKER" serve --data-dir "$DIR/data" --admin none \
  --tcp "127.0.0.1:$PORT" --no-ws --set shards=1 --set "storage.durability=$DURABILITY" \
  --set limits.request_rate_per_sec=10000000 --set limits.request_burst=10000000 >"$DIR/broker.log" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 300); do grep -q "parley listening" "$DIR/broker.log" 2>/dev/null && break; sleep 0.1; done
rc=0
target/release/loadgen pairs --system parley --addr "127.0.0.1:$PORT" --data-dir "$DIR/data" \
  --conns 100 --window "$WINDOW" --body-bytes 100 --warmup 1 --duration 8 --json >"$DIR/run.json" || rc=$?
[ "$rc" = 0 ] || echo "loadgen exited $rc (its checks failed or it could not run)" >&2
kill -INT "$PID"; wait "$PID" || true
DELIVERED=$(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(j['delivered'])" "$DIR/run.json")
IR=$(callgrind_annotate "$DIR/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
echo "broker: $BROKER, durability $DURABILITY, window $WINDOW"
echo "delivered: $DELIVERED messages; instructions: $IR; per delivered message: $((IR / DELIVERED))"
callgrind_annotate "$DIR/cg.out" 2>/dev/null | sed -n '/file:function/,$p' | sed -n '2,16p' | cut -c1-160 || true
