#!/usr/bin/env bash
# Measures the disk's own sequential write bandwidth and flush latency in the directory the log
# benchmarks use, so durable-append figures can be compared with what the disk can do at all.
#
#   bench/disk-bandwidth.sh [DIR]        (default: $TMPDIR or /tmp)
#
# Prints three figures:
#   * direct sequential write bandwidth (dd oflag=direct, 1 MiB blocks, 1 GiB): the ceiling for
#     bytes/s under `always`;
#   * buffered write + one fdatasync at the end (dd conv=fdatasync);
#   * small synchronous writes (dd oflag=dsync, 4 KiB blocks): the cost of one flush, which bounds
#     flushes per second and so decides how many records each group commit must carry.
set -euo pipefail
dir=${1:-${TMPDIR:-/tmp}}
f=$(mktemp -p "$dir" parley-disk-bw.XXXXXX)
trap 'rm -f "$f"' EXIT

rate() { grep -Eo '[0-9.,]+ [kMG]?B/s' | tail -1; }

echo "disk: $(df -h "$dir" | awk 'NR==2 {print $1" ("$2" total)"}') dir=$dir"
echo -n "direct sequential write, 1 MiB blocks x 1024: "
dd if=/dev/zero of="$f" bs=1M count=1024 oflag=direct 2>&1 | rate
echo -n "buffered write 1 GiB + fdatasync:             "
dd if=/dev/zero of="$f" bs=1M count=1024 conv=fdatasync 2>&1 | rate
echo -n "dsync 4 KiB writes x 2000 (one flush each):    "
out=$(dd if=/dev/zero of="$f" bs=4k count=2000 oflag=dsync 2>&1)
secs=$(echo "$out" | grep -Eo '[0-9.,]+ s,' | tr -d ' s,' | tr ',' '.')
echo "$(echo "$out" | rate), $(awk -v s="$secs" 'BEGIN {printf "%.0f flushes/s, %.1f us per flush", 2000/s, s/2000*1e6}')"
