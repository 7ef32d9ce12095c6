#!/usr/bin/env python3
"""Turns one bench/run results directory into Markdown tables.

    python3 bench/report.py bench/results/<timestamp>

Reads runs.tsv (what bench/run ran and how each run ended), <name>.json (loadgen --json),
<name>.log (loadgen's stderr), machine.txt and commands.txt; prints the tables and writes them to
<dir>/table.md. Needs only the Python standard library.
"""

import csv
import json
import os
import sys

# Rows of the main table come from these groups, in this order.
TRAFFIC_GROUPS = ["pairs", "pairs-w1", "open-mid", "open", "fanout", "groups"]
RELAY = "relay (ceiling)"
PARLEY_REF = "parley never"  # what peers (redis, mosquitto) are compared with
PEERS = ("redis", "mosquitto")


def load_runs(d):
    runs = []
    with open(os.path.join(d, "runs.tsv"), newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            path = os.path.join(d, row["name"] + ".json")
            row["json"] = None
            if os.path.exists(path):
                try:
                    with open(path) as jf:
                        row["json"] = json.load(jf)
                except (OSError, ValueError) as e:
                    row["note"] = (row.get("note") or "") + f" (bad JSON: {e})"
            runs.append(row)
    return runs


def last_log_lines(d, name, n=3):
    """The last lines loadgen wrote (not its progress lines, not the system's output)."""
    path = os.path.join(d, name + ".log")
    try:
        with open(path, errors="replace") as f:
            lines = f.read().split("---- system under test output")[0].splitlines()
    except OSError:
        return ""
    lines = [l.strip() for l in lines if l.strip() and not l.startswith("[")]
    return " / ".join(lines[-n:])


def num(x, digits=0):
    if x is None:
        return "—"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def us(x):
    if x is None:
        return "—"
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def fmt_ratio(r):
    if r is None:
        return "—"
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def result(run, d):
    """passed / FAILED (counters) / not run: why / error."""
    j = run["json"]
    note = (run.get("note") or "").strip()
    if j is None:
        if run["rc"] == "-":
            return note or "not run"
        why = note or last_log_lines(d, run["name"])
        return f"error (exit {run['rc']}): {why}".strip()
    if j.get("passed"):
        out = "passed"
    else:
        v = j.get("verdict") or {}
        bad = [f"{k} {v[k]:,}" for k in ("lost", "duplicated", "out_of_order", "corrupt", "gaps",
                                          "outside_window", "misplaced")
               if v.get(k)]
        if j.get("errors"):
            bad.append(f"errors {j['errors']:,}")
        out = "**FAILED**" + (f" ({', '.join(bad)})" if bad else "")
        samples = j.get("error_samples") or []
        if samples:
            out += f": {samples[0][:160]}"
    if (j.get("verdict") or {}).get("redelivered"):
        out += f" (redelivered {j['verdict']['redelivered']:,})"
    if note:
        out += f"; {note}"
    return out


def broker(j, key):
    b = (j or {}).get("broker") or {}
    return b.get(key)


def lat(j, which, key):
    s = (j or {}).get(which) or {}
    return s.get(key) if s.get("count") else None


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def group_title(group, runs):
    j = next((r["json"] for r in runs if r["json"]), None)
    if j is None:
        return group
    body = f", {j['body_bytes']} B" if j.get("body_bytes") else ""
    mode = j.get("mode", "")
    if group == "fanout":
        subs = j.get("clients", 0) - 1  # bench/run uses one publisher
        return f"fanout 1→{subs}, {mode.replace('closed ', '')}{body}"
    if group == "groups":
        return f"groups: {mode.replace('closed ', '')}{body}"
    if group in ("open", "open-mid"):
        return f"pairs {j['clients']:,} clients, {mode.replace('open ', 'open loop ')}{body}"
    return f"pairs {j['clients']:,} clients, {mode.replace('closed ', '')}{body}"


def traffic_table(runs, d):
    rows = []
    for g in TRAFFIC_GROUPS:
        gr = [r for r in runs if r["group"] == g]
        if not gr:
            continue
        title = group_title(g, gr)
        by = {r["system"]: r["json"] for r in gr if r["json"]}
        relay, parley = by.get(RELAY), by.get(PARLEY_REF)
        for r in gr:
            j = r["json"]
            rate = j.get("delivered_per_s") if j else None
            per_cpu = broker(j, "delivered_per_cpu_s")
            vs_relay = vs_parley = "—"
            if j and r["system"] != RELAY and relay:
                vs_relay = (f"{fmt_ratio(ratio(rate, relay.get('delivered_per_s')))} · "
                            f"{fmt_ratio(ratio(per_cpu, broker(relay, 'delivered_per_cpu_s')))}")
            if j and r["system"].startswith(PEERS) and parley:
                vs_parley = (f"{fmt_ratio(ratio(rate, parley.get('delivered_per_s')))} · "
                             f"{fmt_ratio(ratio(per_cpu, broker(parley, 'delivered_per_cpu_s')))}")
            rows.append([
                title, r["system"],
                num(rate) if j else "—",
                num(broker(j, "cores"), 2) if j else "—",
                num(per_cpu),
                us(lat(j, "e2e_latency", "p50_us")),
                us(lat(j, "e2e_latency", "p99_us")),
                us(lat(j, "e2e_latency", "p999_us")),
                vs_relay, vs_parley, result(r, d),
            ])
    return table(["scenario", "system", "delivered msgs/s", "broker cores",
                  "delivered / broker CPU-s", "send→deliver p50 µs", "p99 µs", "p99.9 µs",
                  "÷ relay (msgs/s · per CPU-s)", f"÷ {PARLEY_REF} (msgs/s · per CPU-s)",
                  "result"], rows)


def storm_table(runs, d):
    rows = []
    for r in runs:
        if r["group"] != "storm":
            continue
        j = r["json"]
        rows.append([
            r["system"], num(j.get("conns")) if j else "—",
            num(j.get("logins_per_s")) if j else "—",
            us(lat(j, "login_latency", "p50_us")), us(lat(j, "login_latency", "p99_us")),
            us(lat(j, "connect_latency", "p99_us")),
            num(broker(j, "cores"), 2) if j else "—",
            num(broker(j, "logins_per_cpu_s")),
            result(r, d),
        ])
    return table(["system", "connections", "logins/s", "login p50 µs", "login p99 µs",
                  "connect p99 µs", "broker cores", "logins / broker CPU-s", "result"], rows)


def idle_table(runs, d):
    rows = []
    mib = lambda b: None if b is None else b / 1048576
    for r in runs:
        if r["group"] != "idle":
            continue
        j = r["json"]
        rows.append([
            r["system"], num(j.get("conns")) if j else "—",
            f"{num(mib(broker(j, 'rss_before')), 1)} → {num(mib(broker(j, 'rss_after')), 1)}"
            if j and j.get("broker") else "—",
            num(broker(j, "rss_per_conn")),
            num(broker(j, "anon_per_conn")),
            num(broker(j, "cpu_s"), 2) if j else "—",
            f"{j['measured_s']:g}" if j else "—",
            result(r, d),
        ])
    return table(["system", "connections held", "broker RSS MiB (before → with all)",
                  "RSS per conn, bytes", "anonymous RSS per conn, bytes",
                  "broker CPU-s while idle", "idle s", "result"], rows)


def offline_table(runs, d):
    rows = []
    for r in runs:
        if r["group"] != "offline":
            continue
        j = r["json"]
        msgs = None
        if j and j.get("sync_s") and j.get("sync_msgs_per_s"):
            msgs = j["sync_s"] * j["sync_msgs_per_s"]
        rows.append([
            r["system"], num(j.get("clients")) if j else "—",
            num(msgs),
            num(j.get("sync_s"), 3) if j else "—",
            num(j.get("sync_msgs_per_s")) if j else "—",
            us(lat(j, "sync_latency", "p50_us")), us(lat(j, "sync_latency", "p99_us")),
            num(broker(j, "delivered_per_cpu_s")),
            result(r, d),
        ])
    return table(["system", "clients (half offline)", "messages synced", "catch-up s",
                  "synced msgs/s", "per-client sync p50 µs", "p99 µs",
                  "synced / broker CPU-s (send + sync)", "result"], rows)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench/report.py bench/results/<timestamp>")
    d = sys.argv[1].rstrip("/")
    runs = load_runs(d)
    out = [f"## Macro benchmarks: {os.path.basename(d)}", ""]
    try:
        with open(os.path.join(d, "machine.txt")) as f:
            out += [f"- {l.strip()}" for l in f if l.strip()]
    except OSError:
        pass
    out += ["",
            "Delivered msgs/s: every receiver's copy, over the measured span. Broker cores and per "
            "CPU-s: the system under test's own CPU time (from /proc) over that span. Ratios are "
            f"row ÷ the relay (same scenario) and, for peers, row ÷ {PARLEY_REF}; "
            "each cell: throughput · efficiency. Latency counts from the (intended) send time.",
            ""]
    sections = [("Traffic", traffic_table, TRAFFIC_GROUPS), ("Login storm", storm_table, ["storm"]),
                ("Idle connections", idle_table, ["idle"]),
                ("Offline catch-up", offline_table, ["offline"])]
    for title, fn, groups in sections:
        if any(r["group"] in groups for r in runs):
            out += [f"### {title}", "", fn(runs, d), ""]
    try:
        with open(os.path.join(d, "commands.txt")) as f:
            cmds = f.read().strip()
        if cmds:
            out += ["### Commands", "", "```", cmds, "```", ""]
    except OSError:
        pass
    text = "\n".join(out)
    with open(os.path.join(d, "table.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
