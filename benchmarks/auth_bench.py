#!/usr/bin/env python3
"""What the mail authentication features cost: the same workloads with them off and on.

    python3 benchmarks/auth_bench.py [--pairs 3] [--messages 2000] [--submit-messages 1000]

Two private mailstack instances stay up side by side on loopback, one with
the features off (``[pipeline] checks = ["loop"]``, every ``[inbound]``
check off) and one with them on (``dkimsign`` added to the pipeline;
``inbound.spf``, ``inbound.dkim`` and ``inbound.dmarc`` asking a local DNS
server, ``authdns.AuthDNS``).  Each workload runs against both, one after the
other (only one is under load at a time), ``--pairs`` times, the order of the
two swapped every pair so that a drift in the machine's load touches both
sides alike.  Workloads, ~4 KB messages, one per connection:

* ``accept10`` / ``accept50``: MX accept + Maildir delivery with 10 / 50
  sessions; the messages carry a DKIM-Signature of the sender's domain (on
  both sides; only the "on" server verifies it) -- the inbound checks' cost;
* ``submit10``: submission with AUTH PLAIN (no TLS: loopback), relayed to the
  sink -- the DKIM signing cost;
* ``submit1``: the same with STARTTLS first (``run.py``'s submit1 row).

For each it prints the medians over the pairs of the rate (msg/s until every
message is delivered or at the sink), of the on/off rate ratio within a pair,
and of the server's CPU time per message (user + system from /proc: other
work on a shared machine slows a server but does not add to its CPU time),
as a markdown table.  After each run with the features on it checks that they
ran (run.py ``feature_problems``), and exits 1 if they did not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import authdns  # noqa: E402
import run  # noqa: E402
from mailstackserver import Mailstack  # noqa: E402

WORKLOADS = {
    # key: (label, what is measured, function(target, n, sink_port, work) -> result)
    "accept10": ("MX accept+Maildir, 10 sessions", "inbound checks",
                 lambda t, n, port, work: run.accept_workload(t, n, 10)),
    "accept50": ("MX accept+Maildir, 50 sessions", "inbound checks",
                 lambda t, n, port, work: run.accept_workload(t, n, 50)),
    "submit10": ("submission AUTH + relay, 10 sessions", "DKIM signing",
                 lambda t, n, port, work: run.submit_workload(t, n, 10, port, work, starttls=False)),
    "submit1": ("submit1: STARTTLS + AUTH + relay, 10 sessions", "DKIM signing",
                lambda t, n, port, work: run.submit_workload(t, n, 10, port, work)),
}


def settings(on: bool, nameserver: str) -> dict[str, dict]:
    """The ``extra`` config of the instance with the features on (or off: the defaults
    of mailstackserver, which has them all off)."""
    if not on:
        return {}
    return {
        "pipeline": {"checks": ["loop", "dkimsign"]},
        "inbound": {"spf": True, "dkim": True, "dmarc": True},
        "dns": {"nameservers": [nameserver]},
    }


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarize(key: str, runs: dict[str, list[dict]]) -> dict:
    """Medians over the pairs; ``runs`` maps "off"/"on" to one result per pair."""
    off, on = runs["off"], runs["on"]
    pairs = [(a, b) for a, b in zip(off, on, strict=True) if "na" not in a and "na" not in b]
    if not pairs:
        return {"na": "no complete pair"}
    return {
        "pairs": len(pairs),
        "off_rate": median([a["value"] for a, _ in pairs]),
        "on_rate": median([b["value"] for _, b in pairs]),
        "rate_ratio": median([b["value"] / a["value"] for a, b in pairs]),
        "off_cpu_ms": median([a["cpu_ms_per_msg"] for a, _ in pairs]),
        "on_cpu_ms": median([b["cpu_ms_per_msg"] for _, b in pairs]),
        "cpu_delta_ms": median([b["cpu_ms_per_msg"] - a["cpu_ms_per_msg"] for a, b in pairs]),
        "off_p99_ms": median([a["p99_ms"] for a, _ in pairs]),
        "on_p99_ms": median([b["p99_ms"] for _, b in pairs]),
    }


def table(summary: dict[str, dict], counts: dict[str, int]) -> str:
    head = ("| workload | feature | msgs/run | pairs | off msg/s | on msg/s | on/off rate | "
            "off CPU ms/msg | on CPU ms/msg | CPU cost ms/msg | p99 off/on ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, s in summary.items():
        label, feature, _ = WORKLOADS[key]
        if "na" in s:
            lines.append(f"| {label} | {feature} | {counts[key]} | 0 | n/a: {s['na']} |||||||")
            continue
        lines.append(
            f"| {label} | {feature} | {counts[key]} | {s['pairs']} | {s['off_rate']:.0f} | {s['on_rate']:.0f} | "
            f"{s['rate_ratio']:.2f} | {s['off_cpu_ms']:.2f} | {s['on_cpu_ms']:.2f} | {s['cpu_delta_ms']:+.2f} | "
            f"{s['off_p99_ms']:.0f} / {s['on_p99_ms']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--messages", type=int, default=2000, help="messages per accept run")
    p.add_argument("--submit-messages", type=int, default=1000, help="messages per submit run")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--json", help="write every run's result and the summary here")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, configs)")
    a = p.parse_args(argv)
    keys = [k for k in a.workloads.split(",") if k]
    unknown = set(keys) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    counts = {k: a.submit_messages if k.startswith("submit") else a.messages for k in keys}

    work = tempfile.mkdtemp(prefix="msauth-")
    cleanups = []
    results: dict = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "machine": run.machine(), "loadavg_start": loadavg(), "pairs": a.pairs,
                              "messages": counts},
                     "runs": {k: {"off": [], "on": []} for k in keys}}
    status = 0
    try:
        sink_proc, sink_port = run.start_sink()
        cleanups.append(lambda: (sink_proc.terminate(), sink_proc.wait(10)))
        dns = authdns.AuthDNS(work)
        cleanups.append(dns.stop)
        nameserver = dns.start()
        targets = {}
        for side in ("off", "on"):
            root = os.path.join(work, side)
            os.makedirs(root)
            ms = Mailstack(root, sink_port)
            ms.pop3_enabled = False
            ms.extra = settings(side == "on", nameserver)
            cleanups.append(ms.kill)
            run.log(f"starting mailstack with the features {side}")
            ms.start()
            run.add_users(ms, run.USERS)
            targets[side] = run.Target(side, ms.ports["smtp"], None, ms.roots, ms.roots, ms.maildir,
                                       ms.ports["submission"], (run.SUBMIT_USER, run.PASSWORD), dns.sign)
        problems: set[str] = set()
        for i in range(a.pairs):
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            for key in keys:
                for side in order:
                    t0 = time.monotonic()
                    try:
                        res = WORKLOADS[key][2](targets[side], counts[key], sink_port, work)
                    except Exception as e:  # noqa: BLE001 - a failed run is n/a, the others still count
                        res = {"na": f"{type(e).__name__}: {e}"}
                    res["loadavg"] = loadavg()
                    results["runs"][key][side].append(res)
                    if side == "on" and "na" not in res:
                        # Right after the run: the sink's last message is this server's.
                        inbound = key.startswith("accept")
                        problems.update(run.feature_problems(targets["on"], sink_port, work, inbound, not inbound))
                    run.log(f"pair {i + 1} {key} {side}: {res.get('value', res.get('na'))} msg/s, "
                            f"{res.get('cpu_ms_per_msg')} ms CPU/msg, {time.monotonic() - t0:.1f} s, "
                            f"load {res['loadavg']}")
        results["meta"]["feature_problems"] = sorted(problems)
        status = 1 if problems else 0
    finally:
        for c in reversed(cleanups):
            try:
                c()
            except Exception as e:  # noqa: BLE001
                run.log(f"cleanup: {e}")
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["meta"]["loadavg_end"] = loadavg()
    summary = {k: summarize(k, results["runs"][k]) for k in keys}
    results["summary"] = summary
    meta = results["meta"]
    print(f"\nmailstack auth features off vs on, {meta['date']}, {meta['machine']}")
    print(f"load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; "
          f"medians of {a.pairs} interleaved pairs\n")
    print(table(summary, counts))
    print("\nfeatures verified in delivered/relayed mail: " + ("; ".join(meta["feature_problems"]) or "all ran"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
