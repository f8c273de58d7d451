#!/usr/bin/env python3
"""POP3 only: mailstack next to Dovecot on the very same Maildirs, in one run.

    python3 benchmarks/pop3_bench.py [--big 50000] [--retr 5000] [--runs 3] [--json FILE]

Fills two Maildirs under a private mailstack ``data_dir`` (``--big`` and
``--retr`` messages of ~4 KB, from ``msggen``), then serves them first with a
private Dovecot (``refservers.Dovecot``, mail_location pointing at the same
folders) and, after Dovecot has stopped, with mailstack (``twistd -n mailstack``
via ``mailstackserver.Mailstack``), so the two never compete for the CPU.

Workloads (``pop3client``: blocking socket, one command at a time, USER/PASS on
loopback without TLS for both):

* login+STAT+UIDL of the ``--big`` mailbox: the first session (each server builds
  its index; Dovecot goes first, so it also moves new/ to cur/) and the best of
  ``--runs`` warm sessions;
* RETR of every message of the ``--retr`` mailbox (no DELE, so both servers
  read the same files): best of ``--runs`` after one warm-up session.

Prints seconds per workload, the ratio mailstack/Dovecot (lower is better) and
whether both servers report the same STAT (message count and octets) for each
mailbox.  Needs root for Dovecot; without it only mailstack's column is filled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import msggen  # noqa: E402
import pop3client  # noqa: E402
import refservers  # noqa: E402
from mailstackserver import Mailstack  # noqa: E402
from procmem import free_port  # noqa: E402

DOMAIN = "bench.test"
PASSWORD = "bench-password-1"
BIG = f"pop3big@{DOMAIN}"
SMALL = f"pop3retr@{DOMAIN}"
DOWNLOAD = f"pop3dl@{DOMAIN}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stat_of(port: int, user: str) -> tuple[int, int]:
    c = pop3client.Client("127.0.0.1", port)
    try:
        c.login(user, PASSWORD)
        _, n, octets = c.cmd("STAT").split()[:3]
        c.cmd("QUIT")
        return int(n), int(octets)
    finally:
        c.close()


def retr_all(port: int, user: str) -> dict:
    """USER/PASS, STAT, UIDL, RETR 1..n, QUIT (nothing deleted)."""
    t0 = time.perf_counter()
    c = pop3client.Client("127.0.0.1", port)
    try:
        c.login(user, PASSWORD)
        n = int(c.cmd("STAT").split()[1])
        if len(c.multi("UIDL")) != n:
            raise pop3client.POP3Error("UIDL and STAT disagree")
        total = 0
        for i in range(1, n + 1):
            total += sum(len(line) for line in c.multi(f"RETR {i}"))
        c.cmd("QUIT")
    finally:
        c.close()
    return {"seconds": time.perf_counter() - t0, "messages": n, "bytes": total}


def download_phases(port: int, user: str) -> dict:
    """run.py's pop3_download (USER/PASS, STAT, UIDL, RETR + DELE all, QUIT), timed
    per phase: login (connect to +OK of PASS), list (STAT + UIDL), fetch (the
    RETR/DELE loop), quit (QUIT to its +OK: the deletions), total."""
    t0 = time.perf_counter()
    c = pop3client.Client("127.0.0.1", port)
    try:
        c.login(user, PASSWORD)
        t1 = time.perf_counter()
        n = int(c.cmd("STAT").split()[1])
        if len(c.multi("UIDL")) != n:
            raise pop3client.POP3Error("UIDL and STAT disagree")
        t2 = time.perf_counter()
        for i in range(1, n + 1):
            c.multi(f"RETR {i}")
            c.cmd(f"DELE {i}")
        t3 = time.perf_counter()
        c.cmd("QUIT")
        t4 = time.perf_counter()
    finally:
        c.close()
    return {"login": t1 - t0, "list": t2 - t1, "fetch": t3 - t2, "quit": t4 - t3, "total": t4 - t0, "messages": n}


def download_rounds(servers: list[tuple[str, int]], maildir: str, seed: str, rounds: int) -> dict:
    """Alternate the servers ``rounds`` times on the same freshly linked Maildir."""
    out: dict = {name: [] for name, _ in servers}
    names = sorted(os.listdir(os.path.join(seed, "new")))
    k = 0
    for r in range(rounds):
        for name, port in servers:
            # A first session on a fresh mailbox each time, as in run.py: no index
            # files of either server, names never seen before (new delivery times).
            for entry in os.scandir(maildir):
                if entry.is_file():
                    os.unlink(entry.path)
            for sub in ("new", "cur"):
                for old in os.listdir(os.path.join(maildir, sub)):
                    os.unlink(os.path.join(maildir, sub, old))
            k += 1
            for n in names:
                head, _, rest = n.partition(".")
                os.link(os.path.join(seed, "new", n), os.path.join(maildir, "new", f"{int(head) + 7 * k}.{rest}"))
            msggen.chown_tree(maildir, refservers.VUID, refservers.VUID)
            res = download_phases(port, DOWNLOAD)
            log(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "messages"))
            out[name].append(res)
    return out


def workloads(name: str, port: int, runs: int) -> dict:
    res: dict = {}
    log(f"{name}: login+STAT+UIDL of {BIG}, first session")
    res["uidl_first"] = pop3client.stat_uidl("127.0.0.1", port, BIG, PASSWORD)["seconds"]
    times = [pop3client.stat_uidl("127.0.0.1", port, BIG, PASSWORD)["seconds"] for _ in range(runs)]
    res["uidl_warm"] = min(times)
    log(f"{name}: RETR of all of {SMALL}")
    res["retr_first"] = retr_all(port, SMALL)["seconds"]
    res["retr_warm"] = min(retr_all(port, SMALL)["seconds"] for _ in range(runs))
    res["stat_big"] = stat_of(port, BIG)
    res["stat_small"] = stat_of(port, SMALL)
    log(f"{name}: {res}")
    return res


ROWS = [
    ("uidl_warm", "login+STAT+UIDL, big mailbox, warm (best)"),
    ("uidl_first", "login+STAT+UIDL, big mailbox, first session"),
    ("retr_warm", "RETR all, small mailbox, warm (best)"),
    ("retr_first", "RETR all, small mailbox, first session"),
]


def report(results: dict, big: int, small: int) -> str:
    ms, dv = results.get("mailstack", {}), results.get("dovecot", {})
    out = [f"POP3, {big} and {small} messages of ~4 KB, same Maildirs (seconds; ratio = mailstack/Dovecot)"]
    out.append(f"{'workload':48} {'mailstack':>10} {'dovecot':>10} {'ratio':>7}")
    for key, label in ROWS:
        a, b = ms.get(key), dv.get(key)
        ratio = f"{a / b:.2f}x" if a and b else "n/a"
        fa = f"{a:.3f}" if a is not None else "n/a"
        fb = f"{b:.3f}" if b is not None else "n/a"
        out.append(f"{label:48} {fa:>10} {fb:>10} {ratio:>7}")
    if ms and dv:
        for key, user in (("stat_big", BIG), ("stat_small", SMALL)):
            same = "same" if tuple(ms[key]) == tuple(dv[key]) else "DIFFERENT"
            out.append(f"STAT {user}: mailstack {tuple(ms[key])}, dovecot {tuple(dv[key])}: {same}")
    if "dovecot_skipped" in results:
        out.append(f"Dovecot: n/a ({results['dovecot_skipped']})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--big", type=int, default=50000, help="messages in the login+STAT+UIDL mailbox")
    p.add_argument("--retr", type=int, default=5000, help="messages in the RETR mailbox")
    p.add_argument("--runs", type=int, default=3, help="warm runs per workload (best is reported)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--download", type=int, default=0, metavar="N",
                   help="only run.py's RETR+DELE download of N messages, phase by phase, "
                        "both servers up, alternating for --runs rounds")
    a = p.parse_args(argv)
    if a.download:
        return main_download(a)

    work = tempfile.mkdtemp(prefix="pop3bench-")
    os.chmod(work, 0o755)  # Dovecot's mail processes (uid VUID) walk down to the Maildirs
    ms = Mailstack(work, sink_port=free_port())
    results: dict = {}
    try:
        for user, n in ((BIG, a.big), (SMALL, a.retr)):
            log(f"writing {n} messages for {user}")
            msggen.fill_maildir(ms.maildir(user), n, user, refservers.VUID, refservers.VUID)
        for d in (ms.root, ms.data_dir, os.path.join(ms.data_dir, "mail"), os.path.join(ms.data_dir, "mail", DOMAIN)):
            os.chmod(d, 0o755)

        ok, why = refservers.available()
        if ok:
            dv = refservers.Dovecot(work, {BIG: PASSWORD, SMALL: PASSWORD}, os.path.join(ms.data_dir, "mail"))
            try:
                dv.start()
                results["dovecot"] = workloads("dovecot", dv.port, a.runs)
            finally:
                dv.stop()
        else:
            results["dovecot_skipped"] = why

        ms.start()
        try:
            for user in (BIG, SMALL):
                r = ms.admin("user", "add", user, "--password-stdin", input=PASSWORD + "\n")
                if r.returncode != 0:
                    raise RuntimeError(f"mailstack user add {user}: {r.stderr.strip()}")
            results["mailstack"] = workloads("mailstack", ms.ports["pop3"], a.runs)
        finally:
            ms.stop()
    finally:
        ms.kill()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work folder kept: {work}")
    text = report(results, a.big, a.retr)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"big": a.big, "retr": a.retr, "results": results, "report": text}, f, indent=2)
    return 0


def main_download(a: argparse.Namespace) -> int:
    work = tempfile.mkdtemp(prefix="pop3bench-")
    os.chmod(work, 0o755)
    ms = Mailstack(work, sink_port=free_port())
    dv = None
    try:
        seed = os.path.join(work, "seed")
        log(f"writing {a.download} messages")
        msggen.fill_maildir(seed, a.download, DOWNLOAD, refservers.VUID, refservers.VUID)
        maildir = ms.maildir(DOWNLOAD)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        for d in (ms.root, ms.data_dir, os.path.join(ms.data_dir, "mail"), os.path.join(ms.data_dir, "mail", DOMAIN)):
            os.chmod(d, 0o755)
        msggen.chown_tree(maildir, refservers.VUID, refservers.VUID)
        servers = []
        ok, why = refservers.available()
        if ok:
            dv = refservers.Dovecot(work, {DOWNLOAD: PASSWORD}, os.path.join(ms.data_dir, "mail"))
            dv.start()
            servers.append(("dovecot", dv.port))
        else:
            log(f"Dovecot: n/a ({why})")
        ms.start()
        r = ms.admin("user", "add", DOWNLOAD, "--password-stdin", input=PASSWORD + "\n")
        if r.returncode != 0:
            raise RuntimeError(f"mailstack user add: {r.stderr.strip()}")
        servers.append(("mailstack", ms.ports["pop3"]))
        res = download_rounds(servers, maildir, os.path.join(seed), a.runs)
    finally:
        if dv is not None:
            dv.stop()
        ms.stop()
        ms.kill()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    keys = ("login", "list", "fetch", "quit", "total")
    print(f"RETR+DELE download of {a.download} messages, median of {a.runs} alternating rounds (seconds)")
    print(f"{'':10}" + "".join(f"{k:>9}" for k in keys))
    med = {}
    for name, rows in res.items():
        med[name] = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in keys}
        print(f"{name:10}" + "".join(f"{med[name][k]:9.3f}" for k in keys))
    if len(med) == 2:
        print(f"ratio mailstack/dovecot (total, median): {med['mailstack']['total'] / med['dovecot']['total']:.2f}x; "
              "per round: " + ", ".join(f"{m['total'] / d['total']:.2f}x"
                                         for d, m in zip(res["dovecot"], res["mailstack"], strict=False)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"download": a.download, "rounds": res, "median": med}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
