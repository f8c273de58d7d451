"""Medians over several ``run.py --json`` results: each run is one interleaved pair per workload.

    python3 benchmarks/medians.py results/a1.json results/a2.json results/a3.json

prints, per workload, mailstack's median value, the reference's, and the median
of the per-run ratios (the figure to quote: one run's load drift cancels within
its pair, and the median drops the odd pair out).
"""

from __future__ import annotations

import json
import statistics
import sys

KEYS = ("accept10", "accept50", "accept10c", "relay10", "submit1", "pop3_download", "pop3_uidl", "mem50", "mem50_total")
EXTRA = ("p99_ms", "cpu_ms_per_msg")


def main(paths: list[str]) -> int:
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    print(f"{len(runs)} runs: " + ", ".join(paths))
    print(f"{'workload':14} {'mailstack':>10} {'reference':>10} {'ratio':>7}  {'p99 ms ms/ref':>15} {'cpu ms/msg':>10}")
    for key in KEYS:
        ms = [r["mailstack"].get(key) or {} for r in runs]
        ref = [r["reference"].get(key) or {} for r in runs]
        values = [m["value"] for m in ms if m.get("value") is not None]
        if not values:
            continue
        refs = [x["value"] for x in ref if x.get("value")]
        pairs = zip(ms, ref, strict=True)
        ratios = [m["value"] / x["value"] for m, x in pairs if m.get("value") is not None and x.get("value")]
        p99 = [m["p99_ms"] for m in ms if m.get("p99_ms") is not None]
        p99_ref = [x["p99_ms"] for x in ref if x.get("p99_ms") is not None]
        cpu = [m["cpu_ms_per_msg"] for m in ms if m.get("cpu_ms_per_msg") is not None]

        def med(v: list[float]) -> str:
            return f"{statistics.median(v):.3g}" if v else "-"

        row = f"{key:14} {med(values):>10} {med(refs):>10} {med(ratios):>7}"
        print(f"{row}  {med(p99):>7}/{med(p99_ref):<7} {med(cpu):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
