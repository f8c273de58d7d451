"""Soak test (not in CI): minutes of steady SMTP + POP3 traffic against one mailstack process.

Every interval (default 60 s) it samples the server's RSS (/proc/<pid>/status),
open file descriptors (/proc/<pid>/fd), threads, and the latency of the traffic
of that interval, and prints one row; a flat RSS and fd count and a stable
latency are what "load held" means.  At the end it checks that every
message that got 250 was either retrieved over POP3 or is still in a Maildir,
and that the queue is empty.

Start a private server (temp dir, loopback ports; the default)::

    python3 benchmarks/soak.py --minutes 3

or point it at a running one whose users all have the same password::

    python3 benchmarks/soak.py --pid 1234 --smtp-port 2525 --pop3-port 1100 \\
        --users alice@example.org,bob@example.org --password secret
"""

from __future__ import annotations

import argparse
import os
import poplib
import random
import smtplib
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class Stats:
    """Latencies and counters of the current interval, swapped out at each sample."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()
        self.total_sent = 0
        self.total_retrieved = 0
        self.total_errors = 0
        self.acked: set[str] = set()
        self.retrieved: set[str] = set()

    def reset(self) -> None:
        self.smtp_lat: list[float] = []
        self.pop_lat: list[float] = []
        self.errors = 0
        self.retr = 0

    def take(self) -> tuple[list[float], list[float], int, int]:
        with self.lock:
            out = (self.smtp_lat, self.pop_lat, self.errors, self.retr)
            self.reset()
            return out


def proc_sample(pid: int) -> tuple[float, int, int]:
    """(RSS in MiB, open fds, threads) of ``pid``."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss / 1024.0, fds, threads


def smtp_worker(port: int, users: list[str], rate: float, stop: threading.Event, stats: Stats, seed: int) -> None:
    """One persistent SMTP session sending ``rate`` messages/s (reconnects on error)."""
    rng = random.Random(seed)
    n = 0
    conn = None
    while not stop.is_set():
        t_next = time.monotonic() + 1.0 / rate
        try:
            if conn is None:
                conn = smtplib.SMTP("127.0.0.1", port, timeout=30)
                conn.ehlo("soak.test")
            n += 1
            mid = f"<soak-{seed}-{n}@soak.test>"
            body = (f"Message-ID: {mid}\r\nSubject: soak {n}\r\nFrom: soak@remote.example\r\n\r\n"
                    + "soak body line\r\n" * rng.randint(5, 200))
            t0 = time.monotonic()
            conn.sendmail("soak@remote.example", [rng.choice(users)], body)
            took = time.monotonic() - t0
            with stats.lock:
                stats.smtp_lat.append(took)
                stats.total_sent += 1
                stats.acked.add(mid)
        except (OSError, smtplib.SMTPException):
            with stats.lock:
                stats.errors += 1
                stats.total_errors += 1
            try:
                conn.close()  # type: ignore[union-attr]
            except Exception:
                pass
            conn = None
        time.sleep(max(0.0, t_next - time.monotonic()))
    if conn is not None:
        try:
            conn.quit()
        except Exception:
            pass


def pop3_worker(port: int, user: str, password: str, every: float, stop: threading.Event, stats: Stats) -> None:
    """Every ``every`` seconds: log in as ``user``, RETR and DELE everything, QUIT."""
    while not stop.is_set():
        t_next = time.monotonic() + every
        t0 = time.monotonic()
        try:
            p = poplib.POP3("127.0.0.1", port, timeout=30)
            p.user(user)
            p.pass_(password)
            count, _ = p.stat()
            got = []
            for i in range(1, count + 1):
                _, lines, _ = p.retr(i)
                for line in lines:
                    if line.lower().startswith(b"message-id:"):
                        got.append(line.split(b":", 1)[1].strip().decode())
                        break
                p.dele(i)
            p.quit()
            with stats.lock:
                stats.pop_lat.append(time.monotonic() - t0)
                stats.retr += len(got)
                stats.total_retrieved += len(got)
                stats.retrieved.update(got)
        except (OSError, poplib.error_proto):
            with stats.lock:
                stats.errors += 1
                stats.total_errors += 1
        time.sleep(max(0.0, t_next - time.monotonic()))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--interval", type=float, default=60.0, help="seconds per sample row")
    ap.add_argument("--smtp-sessions", type=int, default=4)
    ap.add_argument("--rate", type=float, default=5.0, help="messages/s per SMTP session")
    ap.add_argument("--pop3-every", type=float, default=2.0, help="seconds between POP3 sessions per user")
    ap.add_argument("--pid", type=int, help="pid of a running server (default: start a private one)")
    ap.add_argument("--smtp-port", type=int)
    ap.add_argument("--pop3-port", type=int)
    ap.add_argument("--users", default="", help="comma-separated local users (running server)")
    ap.add_argument("--password", default="soak-pw")
    args = ap.parse_args(argv)

    server = None
    if args.pid is None:
        from tests.e2e.harness import Server

        root = tempfile.mkdtemp(prefix="mailstack-soak-")
        server = Server(root, extra_toml='[auth]\nplaintext_on_loopback = true\n[limits]\nmessages_per_hour = 0\n')
        users = [f"soak{i}@localhost" for i in range(4)]
        for u in users:
            r = server.admin("user", "add", u, "--password-stdin", input=args.password + "\n")
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
        server.start()
        pid = server.process.pid  # type: ignore[union-attr]
        smtp_port, pop3_port = server.ports["smtp"], server.ports["pop3"]
        print(f"private server pid {pid} in {root}")
    else:
        pid, smtp_port, pop3_port = args.pid, args.smtp_port, args.pop3_port
        users = [u for u in args.users.split(",") if u]
        if not (smtp_port and pop3_port and users):
            ap.error("--pid needs --smtp-port, --pop3-port and --users")

    stats = Stats()
    stop = threading.Event()
    threads = [threading.Thread(target=smtp_worker, args=(smtp_port, users, args.rate, stop, stats, i), daemon=True)
               for i in range(args.smtp_sessions)]
    threads += [threading.Thread(target=pop3_worker, args=(pop3_port, u, args.password, args.pop3_every, stop, stats),
                                 daemon=True) for u in users]
    rows = []
    header = (f"{'t (s)':>6} {'RSS MiB':>8} {'fds':>5} {'thr':>4} {'smtp n':>7} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'max ms':>7} {'pop n':>6} {'pop p50':>8} {'retr':>5} {'err':>4}")
    try:
        rss0, fds0, thr0 = proc_sample(pid)
        print(header)
        print(f"{0:>6} {rss0:>8.1f} {fds0:>5} {thr0:>4}")
        rows.append((0, rss0, fds0, thr0, [], [], 0, 0))
        t_start = time.monotonic()
        for t in threads:
            t.start()
        end = t_start + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(args.interval, max(0.0, end - time.monotonic())))
            smtp_lat, pop_lat, errors, retr = stats.take()
            rss, fds, thr = proc_sample(pid)
            t = time.monotonic() - t_start
            rows.append((t, rss, fds, thr, smtp_lat, pop_lat, errors, retr))
            print(f"{t:>6.0f} {rss:>8.1f} {fds:>5} {thr:>4} {len(smtp_lat):>7} {pct(smtp_lat, 50):>7.1f} "
                  f"{pct(smtp_lat, 95):>7.1f} {(max(smtp_lat) * 1000 if smtp_lat else float('nan')):>7.1f} "
                  f"{len(pop_lat):>6} {pct(pop_lat, 50):>8.1f} {retr:>5} {errors:>4}", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    # Drain: let the last deliveries land and POP3 fetch them once more.
    time.sleep(3)
    for u in users:
        try:
            p = poplib.POP3("127.0.0.1", pop3_port, timeout=30)
            p.user(u)
            p.pass_(args.password)
            count, _ = p.stat()
            for i in range(1, count + 1):
                _, lines, _ = p.retr(i)
                for line in lines:
                    if line.lower().startswith(b"message-id:"):
                        stats.retrieved.add(line.split(b":", 1)[1].strip().decode())
                        break
            p.quit()
        except (OSError, poplib.error_proto) as e:
            print(f"final POP3 check for {u} failed: {e}")
    missing = stats.acked - stats.retrieved
    rss_all = [r[1] for r in rows[1:]]
    fds_all = [r[2] for r in rows[1:]]
    p50s = [pct(r[4], 50) for r in rows[1:] if r[4]]
    print()
    print(f"messages acknowledged {len(stats.acked)}, retrieved over POP3 {len(stats.retrieved & stats.acked)}, "
          f"missing {len(missing)}, client errors {stats.total_errors}")
    if rss_all:
        print(f"RSS MiB first/last/max {rss_all[0]:.1f}/{rss_all[-1]:.1f}/{max(rss_all):.1f}; "
              f"fds first/last/max {fds_all[0]}/{fds_all[-1]}/{max(fds_all)}; "
              f"SMTP p50 per interval {', '.join(f'{x:.1f}' for x in p50s)} ms"
              + (f" (stdev {statistics.pstdev(p50s):.1f})" if len(p50s) > 1 else ""))
    if server is not None:
        q = server.admin("queue", "list", "--json")
        print(f"queue at the end: {q.stdout.strip() or q.stderr.strip()}")
        server.stop()
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
