#!/usr/bin/env bash
# One command for the micro-benchmarks behind bench/RESULTS.md: the disk's own bandwidth, then the
# codec and log criterion benches (release build). Takes about 5 minutes.
#
#   bench/micro.sh                 # everything
#   bench/micro.sh codec           # only the codec benches
#   bench/micro.sh log recovery    # only log benches whose name matches "recovery"
set -euo pipefail
cd "$(dirname "$0")/.."
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r)"
echo "rustc: $(rustc --version)"
case "${1:-all}" in
  all)
    bench/disk-bandwidth.sh
    cargo bench -p parley-bench --bench codec
    cargo bench -p parley-bench --bench log ;;
  codec|log)
    bench=$1; shift
    cargo bench -p parley-bench --bench "$bench" -- "$@" ;;
  *) echo "usage: bench/micro.sh [codec|log [FILTER]]" >&2; exit 2 ;;
esac
