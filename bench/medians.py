#!/usr/bin/env python3
"""Medians of the RESULT lines a bench script collected.

Each line is `RESULT scenario=NAME key=value ...`; prints, per scenario, every key's median with
each run's value in brackets. With `--ratio KEY BASE SCEN...`, also prints the median of KEY of
each SCEN divided by that of BASE.

    python3 bench/medians.py results.txt
    python3 bench/medians.py results.txt --ratio msgs_per_cpu_s one-node split-pairs
"""
import statistics
import sys


def main(argv):
    groups = {}
    for line in open(argv[1]):
        if not line.startswith("RESULT "):
            continue
        kv = dict(f.split("=", 1) for f in line.split()[1:])
        scen = kv.pop("scenario", "")
        for k, v in kv.items():
            groups.setdefault(scen, {}).setdefault(k, []).append(float(v))
    for scen, kv in groups.items():
        parts = [f"{k}={statistics.median(vs):g} [{'/'.join(f'{v:g}' for v in vs)}]" for k, vs in kv.items()]
        print(scen, " ".join(parts))
    if len(argv) > 4 and argv[2] == "--ratio":
        key, base = argv[3], argv[4]
        for scen in argv[5:]:
            a, b = groups.get(scen, {}).get(key), groups.get(base, {}).get(key)
            if a and b:
                print(f"{scen} / {base}, {key}: {statistics.median(a) / statistics.median(b):.2f}")


if __name__ == "__main__":
    main(sys.argv)
