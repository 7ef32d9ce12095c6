#!/usr/bin/env bash
# Messages across nodes (issue 10): 1:1 pairs with every pair split over two nodes of a cluster
# against the same load on one node without a cluster. Two cluster scenarios:
#   split-pairs:   `loadgen pairs --nodes A,B --split --node-ids a,b`: the two users of a pair are
#                  homed on different nodes and each connects to its home, so every message
#                  crosses nodes (forwarded to its owner, or delivered to the other user's home);
#   split-relayed: `--split` alone: each user connects to a node chosen by position while its
#                  home is wherever placement puts it, so about half the clients are relayed to
#                  their home on the other node (what clients behind a plain load balancer do). Both sides run the same number of shard threads (one node
# of SHARDS*2 shards, or two nodes of SHARDS), `storage.durability=never`, loopback only.
# Measured: delivered messages per second, and per second of broker CPU (utime + stime of the
# broker processes, from /proc, over the loadgen run; Redis's CPU is reported apart), and Redis
# commands per delivered message (`INFO commandstats`). Each run (RUNS, default 3) starts fresh;
# medians are printed at the end.
#
#   bench/cluster-split.sh         # ~1.5 min per run
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
CONNS=${CONNS:-1000}
WINDOW=${WINDOW:-16}
DURATION=${DURATION:-10}
SHARDS=${SHARDS:-1}
TARGET=${CARGO_TARGET_DIR:-target}
SECRET=cluster-split-bench-secret-0123456789abcdef
cargo build --release -p parley-broker --bin broker -p parley-loadgen --bin loadgen >&2
ulimit -n 20000
TMP=$(mktemp -d /tmp/bench-split.XXXXXX)
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
ticks() { # CPU ticks (utime + stime) of the given pids, summed
  local t=0
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}
HZ=$(getconf CLK_TCK)
calls() { redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[=,:]' '/^cmdstat_/ {s+=$3} END {print s+0}'; }
started() { # $1: log file
  for _ in $(seq 600); do grep -q "parley listening" "$1" && return 0; sleep 0.1; done
  echo "a node did not start:" >&2; cat "$1" >&2; exit 1
}
broker() { # $1: name, $2: tcp port, then extra arguments
  local name=$1 port=$2
  shift 2
  "$TARGET/release/broker" serve --data-dir "$TMP/$name" --tcp "127.0.0.1:$port" --no-ws --admin none \
    --set "auth.secret=\"$SECRET\"" --set storage.durability=never \
    --set limits.max_connections=30000 --set limits.max_unauthenticated=30000 \
    --set limits.max_unauthenticated_per_source=30000 "$@" >"$TMP/$name.log" 2>&1 &
  PIDS+=($!)
  started "$TMP/$name.log"
}
load() { # the loadgen run; extra arguments say where
  "$TARGET/release/loadgen" pairs --secret "$SECRET" --conns "$CONNS" --window "$WINDOW" \
    --warmup 1 --duration "$DURATION" --json "$@" 2>"$TMP/loadgen.err"
}
result() { # $1: scenario, $2: loadgen json, $3: broker ticks, $4: redis ticks, $5: redis calls
  python3 - "$@" <<'PY'
import json, sys
scen, out, bt, rt, rc = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
hz, secs = int(sys.argv[6]), out["measured_s"]
assert out["passed"], f"loadgen found lost, doubled or reordered messages: {out}"
d = out["delivered"]
cpu = bt / hz
print(f"RESULT scenario={scen} delivered_per_s={out['delivered_per_s']:.0f} "
      f"broker_cpu_s={cpu:.2f} msgs_per_cpu_s={d / cpu:.0f} redis_cpu_s={rt / hz:.2f} "
      f"redis_calls_per_msg={rc / d:.5f}")
PY
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "commit: $(git rev-parse --short HEAD); $(redis-server --version | cut -d' ' -f1-3)"
OUT=$TMP/results
: >"$OUT"
for run in $(seq "$RUNS"); do
  rm -rf "$TMP/one" "$TMP/a" "$TMP/b"
  # One node, no cluster.
  ONE=$(free_port)
  broker one "$ONE" --shards $((SHARDS * 2))
  t0=$(ticks "${PIDS[0]}")
  json=$(load --addr "127.0.0.1:$ONE")
  t1=$(ticks "${PIDS[0]}")
  result one-node "$json" $((t1 - t0)) 0 0 "$HZ" | tee -a "$OUT"
  stop_all
  # Two nodes, every pair split.
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" >"$TMP/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  A=$(free_port); B=$(free_port); AL=$(free_port); BL=$(free_port)
  for n in a b; do
    if [ $n = a ]; then port=$A; link=$AL; else port=$B; link=$BL; fi
    broker $n "$port" --shards "$SHARDS" --cluster "redis://127.0.0.1:$REDIS_PORT" --node-id $n \
      --cluster-listen "127.0.0.1:$link" --cluster-nodes a,b
  done
  for _ in $(seq 100); do grep -q "link to" "$TMP/a.log" && break; sleep 0.1; done
  # Logins are taken once a node has been linked to the others for a heartbeat (2 s).
  sleep 3
  for scen in split-pairs split-relayed; do
    ids=(--node-ids a,b)
    [ $scen = split-relayed ] && ids=()
    t0=$(ticks "${PIDS[1]}" "${PIDS[2]}"); r0=$(ticks "${PIDS[0]}"); c0=$(calls)
    json=$(load --nodes "127.0.0.1:$A,127.0.0.1:$B" --split "${ids[@]}")
    t1=$(ticks "${PIDS[1]}" "${PIDS[2]}"); r1=$(ticks "${PIDS[0]}"); c1=$(calls)
    result $scen "$json" $((t1 - t0)) $((r1 - r0)) $((c1 - c0)) "$HZ" | tee -a "$OUT"
  done
  grep -ci "panick" "$TMP"/*.log >/dev/null && echo "a node's log mentions a panic" >&2
  stop_all
done
echo "--- medians over $RUNS runs"
python3 bench/medians.py "$OUT" --ratio msgs_per_cpu_s one-node split-pairs split-relayed
