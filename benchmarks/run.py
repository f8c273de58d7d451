#!/usr/bin/env python3
"""mailstack next to Postfix and Dovecot: the same workloads against each, one table.

    python3 benchmarks/run.py [--messages N] [--quick] [--json FILE] [--profile DIR]

Sets up, in a temp folder on loopback high ports: a counting SMTP sink; private
Postfix (``postfix -c``) and Dovecot (``dovecot -c``) instances; then a private
mailstack (``twistd -n mailstack``).  All servers stay up (idle when not under
test) and each workload runs against the reference and then against mailstack,
back to back, so that the load of a shared machine drifts little within a pair;
only one server is ever under load.  Everything is torn down on exit, failures included.  Needs root for the
reference servers; without Postfix/Dovecot (or root) their side shows ``n/a``.

Workloads, ~4 KB messages, one per connection:

* accept + Maildir delivery with 10 and 50 concurrent sessions: msg/s from the
  first connection until the last acknowledged message is in its Maildir,
  DATA-to-250 p50/p99, the largest PSS of the server's processes during the run;
  every acknowledged Message-ID is checked in the Maildirs;
* the same at 10 sessions with Postfix's ``smtp-source`` as the client
  (``accept10c``): a C client leaves the servers more of the two cores;
* relay: 10 sessions inject mail for an alias that forwards to a remote address;
  msg/s until the sink has received the last one (Message-IDs checked there);
* submit1: 10 sessions on the submission port, one message per connection, each
  with STARTTLS and (mailstack) AUTH PLAIN, to remote addresses: msg/s until the
  sink has the last one.  Postfix's submission port trusts 127.0.0.0/8
  (mynetworks) instead of AUTH, as no SASL server is set up for it;
* POP3: USER/PASS, STAT, UIDL, RETR + DELE of all N (5000), QUIT: seconds;
* POP3: USER/PASS, STAT, UIDL, QUIT on a 50,000-message Maildir, warm (best of 5);
* memory: PSS at 50 sessions (from the 50-session run);
* one 30 MB message: the server's RSS growth while it receives and delivers it;
* 100,000 deferred messages in mailstack's queue: start-up time to listening,
  RSS once settled, ``mailstack queue list`` time;
* the machine's fsync ceiling for 4 KB Maildir commits (1 and 16 threads), for context.

``--quick`` uses tens of messages and skips the 50k / 100k / 30 MB workloads (CI).
``--features`` starts mailstack with every optional feature whose config key
exists (``FEATURES``) and lists the ones that do not exist yet.  The inbound
checks ask a local DNS server (``authdns.AuthDNS``) about the load sender's
domain, whose messages then carry a DKIM-Signature (added before the clock
starts, for both servers); at the end the run checks that the features worked:
an Authentication-Results field with spf, dkim and dmarc ``pass`` in a
delivered message, a DKIM-Signature on submitted mail at the sink.
Every SMTP row also records the server's CPU time per message (``cpu_ms_per_msg``
in the JSON).
A mailstack part that is not there yet (no POP3 listener, say) shows ``n/a``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import authdns  # noqa: E402
import loadclient  # noqa: E402
import msggen  # noqa: E402
import pop3client  # noqa: E402
import procmem  # noqa: E402
import refservers  # noqa: E402
import sink  # noqa: E402
from mailstackserver import Mailstack, fill_queue  # noqa: E402
from mailstackserver import _env as ms_env  # noqa: E402

DOMAIN = "bench.test"
PASSWORD = "bench-password-1"
N_USERS = 10
N_RELAY = 10
POP_USER = f"pop5k@{DOMAIN}"
BIG_USER = f"popbig@{DOMAIN}"
BIG30_USER = f"big30@{DOMAIN}"
USERS = [f"user{i}@{DOMAIN}" for i in range(N_USERS)]
SUBMIT_USER = USERS[0]  # one application account sending over submission
ALIASES = {f"relay{k}@{DOMAIN}": f"dest{k}@remote.test" for k in range(N_RELAY)}

# key, label, kind ("rate": msg/s higher is better; "time": seconds lower is better;
# "mem": MB lower is better), target text
ROWS = [
    ("accept10", "accept+Maildir, 10 sessions", "rate", ">= 2.0x Postfix, p99 <= Postfix"),
    ("accept50", "accept+Maildir, 50 sessions", "rate", ">= 2.0x Postfix, p99 <= Postfix"),
    ("accept10c", "accept+Maildir, 10 sessions, smtp-source", "rate", ">= 2.0x Postfix"),
    ("relay10", "relay to sink, 10 sessions", "rate", ">= 2.0x Postfix"),
    ("submit1", "submit+relay, 1 msg/conn, STARTTLS+AUTH*", "rate", ">= 300 msg/s"),
    ("pop3_download", "POP3 RETR+DELE all", "time", "<= 0.8x Dovecot"),
    ("pop3_uidl", "POP3 login+STAT+UIDL 50k warm", "time", "<= 0.8x Dovecot"),
    ("mem50", "PSS at 50 sessions, largest process (MB)", "mem", "<= 60 MB"),
    ("mem50_total", "PSS at 50 sessions, all processes (MB)", "mem", "-"),
    ("big30", "30 MB message RSS growth (MB)", "mem", "< 50 MB"),
    ("queue_start", "100k queued: start-up (s)", "time", "< 5 s"),
    ("queue_rss", "100k queued: RSS (MB)", "mem", "< 300 MB"),
    ("queue_list", "100k queued: queue list (s)", "time", "-"),
    ("fsync1", "machine: 4 KB Maildir fsyncs/s, 1 thread", "rate", "-"),
    ("fsync16", "machine: 4 KB Maildir fsyncs/s, 16 threads", "rate", "-"),
]


SUBMIT_NOTE = ("* submit1: mailstack authenticates every connection (AUTH PLAIN, Argon2id); "
               "Postfix relays for 127.0.0.0/8 (mynetworks) without AUTH")

# ``--features``: (feature, dotted config key, value, needs the local DNS server).
# A key the running code does not declare is listed as missing rather than set, so
# the run never claims a feature that was not on.  The inbound checks look up
# SPF/DKIM/DMARC records, so they are on only with the local DNS server
# (``authdns``, set as ``dns.nameservers``), never asking the real DNS.
FEATURES = [
    ("DKIM signing of submitted mail", "pipeline.checks", ["loop", "dkimsign"], False),
    ("metrics", "listen.metrics", "port", False),
    ("inbound SPF", "inbound.spf", True, True),
    ("inbound DKIM verification", "inbound.dkim", True, True),
    ("inbound DMARC", "inbound.dmarc", True, True),
]


def feature_settings(declared: set[str], port_for, nameserver: str | None = None
                     ) -> tuple[dict[str, dict], list[str], list[str]]:
    """({section: {key: value}}, enabled, missing) for the FEATURES keys in ``declared``;
    those that look up DNS records only with a local ``nameserver`` ("127.0.0.1:port")."""
    extra: dict[str, dict] = {}
    enabled, missing = [], []
    for label, dotted, value, needs_dns in FEATURES:
        if dotted not in declared:
            missing.append(f"{label} (no config key {dotted})")
            continue
        if needs_dns:
            if nameserver is None or "dns.nameservers" not in declared:
                missing.append(f"{label} (needs a local DNS server)")
                continue
            extra.setdefault("dns", {})["nameservers"] = [nameserver]
        if value == "port":
            value = [f"tcp:{port_for()}:interface=127.0.0.1"]
        section, _, key = dotted.partition(".")
        extra.setdefault(section, {})[key] = value
        enabled.append(f"{label} ({dotted})")
    return extra, enabled, missing


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def na(reason: str) -> dict:
    return {"na": reason[:300]}


# -- the servers under test, seen the same way -------------------------------------


class Target:
    """What the workloads need of a server: ports, process roots, Maildir paths."""

    def __init__(self, name, smtp_port, pop3_port, smtp_roots, pop3_roots, maildir, submission_port=None,
                 submission_auth=None, mx_transform=None):
        self.name = name
        self.mx_transform = mx_transform  # rewrites each MX load message before the clock starts (DKIM-signs it)
        self.smtp_port = smtp_port
        self.submission_port = submission_port
        self.submission_auth = submission_auth  # (user, password) for AUTH PLAIN, or None
        self.pop3_port = pop3_port
        self.smtp_roots = smtp_roots
        self.pop3_roots = pop3_roots
        self.maildir = maildir


class Side:
    """One server under test in a run: its results, target and Maildir filler."""

    def __init__(self, name, res, t, fill, ms=None, pop3=True):
        self.name, self.res, self.t, self.fill, self.ms, self.pop3 = name, res, t, fill, ms, pop3


# -- workloads ----------------------------------------------------------------------

_MSGID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.I | re.M)


STALL_SECONDS = 20.0  # give up waiting for deliveries after this long without progress


class Stall:
    """True once a counter has not moved for `seconds`."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.value = None
        self.since = time.monotonic()

    def stalled(self, value) -> bool:
        now = time.monotonic()
        if value != self.value:
            self.value, self.since = value, now
            return False
        return now - self.since > self.seconds


def wait_for_count(count, target: int, interval: float = 0.02) -> int:
    """Poll ``count()`` until it reaches ``target`` or has not moved for
    STALL_SECONDS; returns its last value."""
    stall = Stall(STALL_SECONDS)
    while True:
        got = count()
        if got >= target or stall.stalled(got):
            return got
        time.sleep(interval)


def maildir_ids(paths: list[str]) -> set[str]:
    ids = set()
    for p in paths:
        for sub in ("new", "cur"):
            try:
                entries = list(os.scandir(os.path.join(p, sub)))
            except FileNotFoundError:
                continue
            for e in entries:
                try:
                    with open(e.path, "rb") as f:
                        head = f.read(4096)
                except OSError:
                    continue
                m = _MSGID.search(head)
                if m:
                    ids.add(m.group(1).decode("ascii", "replace"))
    return ids


def _load(t: Target, n, sessions, rcpt_for, body=None, timeout=120.0, port=None, **kw):
    return asyncio.run(loadclient.run_load("127.0.0.1", port or t.smtp_port, n, sessions, rcpt_for, body=body,
                                           timeout=timeout, **kw))


def _load_fields(res) -> dict:
    return {
        "sent": res.sent,
        "failed": res.failed,
        "errors": dict(list(res.errors.items())[:3]),
        "accept_rate": round(res.rate, 1),
        "p50_ms": loadclient._ms(res.percentile(50)),
        "p99_ms": loadclient._ms(res.percentile(99)),
    }


def accept_workload(t: Target, n: int, sessions: int, profile_svg: str | None = None, pid: int | None = None) -> dict:
    """n messages to USERS over `sessions` sessions; rate until all are in Maildirs."""
    dirs = [t.maildir(u) for u in USERS]
    base = sum(msggen.count_maildir(d) for d in dirs)
    prof = start_profile(profile_svg, pid) if profile_svg and pid else None
    cpu0 = procmem.tree_cpu(t.smtp_roots())
    with procmem.Sampler(t.smtp_roots, 0.25) as mem:
        res = _load(t, n, sessions, lambda i: USERS[i % N_USERS], transform=t.mx_transform)
        got = wait_for_count(lambda: sum(msggen.count_maildir(d) for d in dirs) - base, res.sent)
        done = time.time()
        cpu = procmem.tree_cpu(t.smtp_roots()) - cpu0
    if prof:
        stop_profile(prof)
    if res.sent == 0:
        return na("no message accepted: " + "; ".join(list(res.errors)[:2]))
    out = _load_fields(res)
    out.update({
        "value": round(res.sent / (done - res.start), 1),
        "unit": "msg/s",
        "delivered": got,
        "seconds": round(done - res.start, 3),
        "pss_mb": round(mem.max_pss / 1e6, 1),
        "pss_process_mb": round(mem.max_process_pss / 1e6, 1),
        "cpu_ms_per_msg": round(1000 * cpu / res.sent, 3),
    })
    missing = set(res.acked_ids) - maildir_ids(dirs)
    if missing:
        out["lost"] = len(missing)
    return out


def source_accept_workload(t: Target, n: int, sessions: int) -> dict:
    """accept10 with Postfix's ``smtp-source`` (C) as the client instead of the
    Python ``loadclient``: n messages of 4,000 bytes to one user, one per
    connection, rate until all are in the Maildir.  On two cores the Python
    client's CPU (about 0.6 ms per message, three times smtp-source's) is taken
    from the server under test; this row shows what is left without most of
    it.  smtp-source reports no latencies and no Message-IDs: delivered counts
    are checked instead."""
    exe = shutil.which("smtp-source")
    if not exe:
        return na("smtp-source not installed (postfix package)")
    d = t.maildir(USERS[0])
    base = msggen.count_maildir(d)
    cpu0 = procmem.tree_cpu(t.smtp_roots())
    start = time.time()
    proc = subprocess.run([exe, "-s", str(sessions), "-m", str(n), "-l", "4000", "-f", "loadclient@client.test",
                           "-t", USERS[0], "-M", "client.test", f"127.0.0.1:{t.smtp_port}"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return na(f"smtp-source failed: {(proc.stderr or proc.stdout).strip()[:200]}")
    got = wait_for_count(lambda: msggen.count_maildir(d) - base, n)
    done = time.time()
    cpu = procmem.tree_cpu(t.smtp_roots()) - cpu0
    out = {"value": round(n / (done - start), 1), "unit": "msg/s", "delivered": got,
           "seconds": round(done - start, 3), "cpu_ms_per_msg": round(1000 * cpu / n, 3)}
    if got < n:
        out["lost"] = n - got
    return out


def relay_workload(t: Target, n: int, sessions: int, sink_port: int, work: str, profile_svg: str | None = None,
                   pid: int | None = None) -> dict:
    """n messages to aliases that forward to remote.test; rate until the sink has them."""
    aliases = list(ALIASES)
    prof = start_profile(profile_svg, pid, subprocesses=True) if profile_svg and pid else None
    try:
        return sink_workload(t, n, sessions, sink_port, work, lambda i: aliases[i % N_RELAY],
                             transform=t.mx_transform)
    finally:
        if prof:
            stop_profile(prof)


def submit_workload(t: Target, n: int, sessions: int, sink_port: int, work: str, starttls: bool = True) -> dict:
    """n messages on the submission port, one per connection, each with STARTTLS (unless
    not ``starttls``) and (where the server asks for it) AUTH PLAIN, to remote addresses;
    rate until the sink has them."""
    if t.submission_port is None:
        return na("no submission listener")
    dests = list(ALIASES.values())
    auth = t.submission_auth
    return sink_workload(t, n, sessions, sink_port, work, lambda i: dests[i % N_RELAY], port=t.submission_port,
                         sender=SUBMIT_USER, auth_for=(lambda i: auth) if auth else None, starttls=starttls)


def sink_workload(t: Target, n: int, sessions: int, sink_port: int, work: str, rcpt_for, **load) -> dict:
    sink.control(sink_port, "XRESET")
    cpu0 = procmem.tree_cpu(t.smtp_roots())
    with procmem.Sampler(t.smtp_roots, 0.25) as mem:
        res = _load(t, n, sessions, rcpt_for, **load)
        stall = Stall(STALL_SECONDS)
        while True:
            count, first, last = sink.count(sink_port)
            if count >= res.sent or stall.stalled(count):
                break
            time.sleep(0.05)
        cpu = procmem.tree_cpu(t.smtp_roots()) - cpu0
    if res.sent == 0:
        return na("no message accepted: " + "; ".join(list(res.errors)[:2]))
    if count == 0:
        return na(f"{res.sent} accepted, none reached the sink within {STALL_SECONDS:.0f} s")
    out = _load_fields(res)
    out.update({
        "value": round(count / (last - res.start), 1),
        "unit": "msg/s",
        "relayed": count,
        "seconds": round(last - res.start, 3),
        "pss_mb": round(mem.max_pss / 1e6, 1),
        "cpu_ms_per_msg": round(1000 * cpu / res.sent, 3),
    })
    dump = os.path.join(work, f"sink-ids-{t.name}.txt")
    sink.control(sink_port, f"XDUMP {dump}")
    with open(dump) as f:
        seen = set(f.read().split())
    missing = set(res.acked_ids) - seen
    if missing:
        out["lost"] = len(missing)
    return out


def header_block(message: bytes) -> bytes:
    """The header section, continuation lines unfolded (RFC 5322 section 2.2.3)."""
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return re.sub(rb"\r?\n[ \t]+", b" ", head)


def newest_message(paths: list[str]) -> bytes:
    """The most recently delivered message in the Maildirs ``paths`` (b"" if none)."""
    newest = max((e for p in paths for sub in ("new", "cur") if os.path.isdir(os.path.join(p, sub))
                  for e in os.scandir(os.path.join(p, sub))),
                 key=lambda e: e.stat().st_mtime_ns, default=None)
    if newest is None:
        return b""
    with open(newest.path, "rb") as f:
        return f.read()


def feature_problems(t: Target, sink_port: int, work: str, inbound: bool, signing: bool) -> list[str]:
    """What shows that a feature did not run (empty: all ran): with ``inbound``, the
    newest delivered message has an Authentication-Results field with spf, dkim and
    dmarc ``pass``; with ``signing``, the last message at the sink (submitted mail)
    carries a DKIM-Signature of our domain."""
    problems = []
    if inbound:
        head = header_block(newest_message([t.maildir(u) for u in USERS]))
        results = [line for line in head.split(b"\n") if line.lower().startswith(b"authentication-results:")]
        for want in (b"spf=pass", b"dkim=pass", b"dmarc=pass"):
            if not any(want in line for line in results):
                problems.append(f"no {want.decode()} in the delivered message's Authentication-Results: "
                                f"{b' / '.join(results)[:300]!r}")
    if signing:
        path = os.path.join(work, f"sink-last-{t.name}.eml")
        sink.control(sink_port, f"XLAST {path}")
        with open(path, "rb") as f:
            head = header_block(f.read())
        if not re.search(rb"^DKIM-Signature:.*\bd=" + DOMAIN.encode() + rb";", head, re.M | re.I):
            problems.append(f"no DKIM-Signature with d={DOMAIN} on the submitted message at the sink")
    return problems


def pop3_download(t: Target, user: str) -> dict:
    with procmem.Sampler(t.pop3_roots, 0.25) as mem:
        r = pop3client.full_download("127.0.0.1", t.pop3_port, user, PASSWORD)
    login = pop3_login_time(t, user)
    return {"value": round(r["seconds"], 3), "unit": "s", "messages": r["messages"], "bytes": r["bytes"],
            "login_s": login, "pss_mb": round(mem.max_pss / 1e6, 1)}


def pop3_uidl(t: Target, user: str, runs: int = 5) -> dict:
    first = pop3client.stat_uidl("127.0.0.1", t.pop3_port, user, PASSWORD)  # warm-up (index, cache)
    with procmem.Sampler(t.pop3_roots, 0.25) as mem:
        times = [pop3client.stat_uidl("127.0.0.1", t.pop3_port, user, PASSWORD)["seconds"] for _ in range(runs)]
    return {"value": round(min(times), 3), "unit": "s", "messages": first["messages"],
            "cold_s": round(first["seconds"], 3), "runs_s": [round(x, 3) for x in times],
            "login_s": pop3_login_time(t, user), "pss_mb": round(mem.max_pss / 1e6, 1)}


def pop3_login_time(t: Target, user: str) -> float:
    t0 = time.perf_counter()
    c = pop3client.Client("127.0.0.1", t.pop3_port)
    try:
        c.login(user, PASSWORD)
        el = time.perf_counter() - t0
        c.cmd("QUIT")
    finally:
        c.close()
    return round(el, 3)


def big_message(t: Target, size: int) -> dict:
    """RSS growth (and PSS) of the server while one `size`-byte message goes in and is delivered."""
    _, body = msggen.make_big_message("big@client.test", BIG30_USER, size)
    d = t.maildir(BIG30_USER)
    base = msggen.count_maildir(d)
    time.sleep(0.5)
    rss0 = procmem.tree_rss(t.smtp_roots())
    pss0 = procmem.tree_pss(t.smtp_roots())
    with procmem.Sampler(t.smtp_roots, 0.05) as mem:
        res = _load(t, 1, 1, lambda i: BIG30_USER, body=body, timeout=300)
        deadline = time.time() + 120
        while msggen.count_maildir(d) <= base and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    if res.sent != 1:
        return na("30 MB message refused: " + "; ".join(list(res.errors)[:1]))
    return {"value": round((mem.max_rss - rss0) / 1e6, 1), "unit": "MB",
            "pss_growth_mb": round((mem.max_pss - pss0) / 1e6, 1),
            "rss_before_mb": round(rss0 / 1e6, 1), "seconds": round(res.elapsed, 2),
            "delivered": msggen.count_maildir(d) > base}


def fsync_ceiling(work: str, threads: int, seconds: float) -> dict:
    """4 KB Maildir commits (tmp write, fsync, rename to new, fsync new/) per second."""
    root = os.path.join(work, f"fsync{threads}")
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    data = msggen.make_message("a@b.test", "c@d.test")[1]
    stop = time.monotonic() + seconds
    counts = [0] * threads
    newdir = os.path.join(root, "new")

    def worker(k):
        i = 0
        dfd = os.open(newdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while time.monotonic() < stop:
                name = f"{k}.{i}"
                tmp = os.path.join(root, "tmp", name)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                os.rename(tmp, os.path.join(newdir, name))
                os.fsync(dfd)
                i += 1
        finally:
            os.close(dfd)
        counts[k] = i

    t0 = time.monotonic()
    ths = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    el = time.monotonic() - t0
    shutil.rmtree(root, ignore_errors=True)
    return {"value": round(sum(counts) / el, 0), "unit": "/s"}


# -- profiling ----------------------------------------------------------------------


def start_profile(svg: str, pid: int, subprocesses: bool = False):
    """py-spy on ``pid`` (and, with ``subprocesses``, its session workers)."""
    exe = shutil.which("py-spy")
    if not exe:
        log("py-spy not installed; no profile (pip install py-spy)")
        return None
    raw = os.path.splitext(svg)[0] + ".txt"
    sub = ["--subprocesses"] if subprocesses else []
    procs = [
        subprocess.Popen([exe, "record", "--pid", str(pid), "-o", svg, "--rate", "200", "--nonblocking", *sub],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([exe, "record", "--pid", str(pid), "-o", raw, "--format", "raw", "--rate", "200",
                          "--nonblocking", "--threads", *sub],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    time.sleep(1.0)  # attach
    return procs


def stop_profile(procs) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def hotspots(raw_path: str, top: int = 10) -> dict:
    """Per thread group ("reactor" = MainThread, "pool" = the others): samples, the
    top functions by self time and mailstack's top functions by inclusive time, from py-spy's raw output
    (``thread (id): name;frame;frame... count``).  Percentages are of that group's samples.
    """
    groups: dict[str, dict] = {}
    skip_incl = ("<module>", "run (", "runApp", "ApplicationRunner", "startReactor", "runReactorWithLogging",
                 "ReactorBase.run ", "ReactorBase.mainLoop", "_bootstrap", "Thread.run", "_worker",
                 "ThreadPool._worker", "context.call", "ContextTracker", "callWithContext", "_newThreadFunction")
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            n = int(n)
            frames = stack.split(";")
            if frames and frames[0].startswith("thread ("):
                name = "reactor" if frames[0].endswith("MainThread") else "pool"
                frames = frames[1:]
            else:
                name = "all"
            g = groups.setdefault(name, {"samples": 0, "self": {}, "incl": {}})
            g["samples"] += n
            if frames:
                g["self"][frames[-1]] = g["self"].get(frames[-1], 0) + n
            for fr in set(frames):
                # inclusive ranking: the project's own functions (Twisted's frames are everywhere)
                if "(mailstack/" in fr and not fr.startswith(skip_incl):
                    g["incl"][fr] = g["incl"].get(fr, 0) + n
    out = {}
    for name, g in groups.items():
        tot = g["samples"] or 1

        def rank(d: dict, tot: int = tot) -> list:
            return [[k, round(100.0 * v / tot, 1)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

        out[name] = {"samples": g["samples"], "self": rank(g["self"]), "inclusive": rank(g["incl"])}
    return out


# -- table --------------------------------------------------------------------------


def ratio_and_met(key: str, kind: str, ref: dict | None, ms: dict | None) -> tuple[float | None, str]:
    """mailstack's ratio to the reference and whether the issue's target is met."""
    if not ms or "na" in ms:
        return None, "n/a"
    v = ms["value"]
    r = None
    if ref and "na" not in ref and ref.get("value"):
        r = v / ref["value"]
    if key in ("accept10", "accept50"):
        if r is None:
            return None, "n/a"
        p99_ok = ms.get("p99_ms") is not None and ref.get("p99_ms") is not None and ms["p99_ms"] <= ref["p99_ms"]
        ok = r >= 2.0 and p99_ok and not ms.get("lost")
        return r, "met" if ok else "NOT met"
    if key in ("relay10", "accept10c"):
        return r, "n/a" if r is None else ("met" if r >= 2.0 and not ms.get("lost") else "NOT met")
    if key == "submit1":
        return r, "met" if v >= 300 else "NOT met"
    if key in ("pop3_download", "pop3_uidl"):
        return r, "n/a" if r is None else ("met" if r <= 0.8 else "NOT met")
    limits = {"mem50": (60, True), "big30": (50, False), "queue_start": (5, False), "queue_rss": (300, False)}
    if key in limits:
        lim, inclusive = limits[key]
        ok = v <= lim if inclusive else v < lim
        return r, "met" if ok else "NOT met"
    return r, "-"


def fmt_value(d: dict | None) -> str:
    if not d:
        return "-"
    if "na" in d:
        return "n/a"
    v = d["value"]
    unit = d.get("unit", "")
    s = f"{v:.0f}" if unit in ("msg/s", "/s") else (f"{v:.3f} s" if unit == "s" else f"{v:.1f}")
    if unit == "msg/s":
        s += " msg/s"
    if d.get("p50_ms") is not None:
        s += f", p50/p99 {d['p50_ms']:.0f}/{d['p99_ms']:.0f} ms"
    if d.get("pss_mb"):
        s += f", PSS {d['pss_mb']:.0f} MB"
    if d.get("loaded_s") is not None:
        s += f" (queue loaded at {d['loaded_s']:.1f} s)"
    if d.get("lost"):
        s += f", LOST {d['lost']}"
    if d.get("failed"):
        s += f", {d['failed']} failed"
    return s


def table(results: dict) -> str:
    ref, ms = results["reference"], results["mailstack"]
    rows = []
    for key, label, kind, target in ROWS:
        if key.startswith("fsync"):
            rows.append([label, fmt_value(ref.get(key)), "-", "-", "-", "-"])
            continue
        r, met = ratio_and_met(key, kind, ref.get(key), ms.get(key))
        rows.append([label, fmt_value(ref.get(key)), fmt_value(ms.get(key)),
                     "-" if r is None else f"{r:.2f}x", target, met])
    head = ["workload", "Postfix / Dovecot", "mailstack", "ratio", "target", "met?"]
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"  # noqa: E731
    sep = "|-" + "-|-".join("-" * w for w in widths) + "-|"
    out = [line(head), sep] + [line(r) for r in rows]
    notes = []
    for side in ("reference", "mailstack"):
        why: dict[str, list[str]] = {}
        for key, d in results[side].items():
            if isinstance(d, dict) and "na" in d and not key.startswith("fsync"):
                why.setdefault(d["na"], []).append(key)
        for reason, keys in why.items():
            notes.append(f"n/a {side} ({', '.join(keys)}): {reason}")
    if "submit1" in ms or "submit1" in ref:
        notes.append(SUBMIT_NOTE)
    features = results["meta"].get("features")
    if features is not None:
        notes.append("mailstack --features on: " + ("; ".join(features["enabled"]) or "none available"))
        notes.append("  not available yet: " + ("; ".join(features["missing"]) or "none"))
        if "problems" in features:
            notes.append("  verified in delivered/relayed mail: "
                         + ("; ".join(features["problems"]) or "all of them ran"))
    return "\n".join(out + ([""] + notes if notes else []))


# -- the run ------------------------------------------------------------------------


class Run:
    def __init__(self, args):
        global STALL_SECONDS
        self.a = args
        if args.quick:
            STALL_SECONDS = 10.0
        self.quick = args.quick
        self.n = args.messages or (40 if args.quick else 5000)
        self.n_pop = args.pop_messages or (40 if args.quick else 5000)
        self.n_submit = args.messages or (20 if args.quick else 5000)
        self.n_big = 0 if args.quick else args.big_mailbox
        self.only = set(args.workloads.split(",")) if args.workloads else None
        self.n_queue = 0 if args.quick else args.queue_messages
        self.work = tempfile.mkdtemp(prefix="mailstack-bench-", dir=args.workdir)
        if len(self.work) > 60:
            # Postfix's and Dovecot's unix sockets live below it: sun_path is 108 bytes.
            os.rmdir(self.work)
            self.work = tempfile.mkdtemp(prefix="msb-", dir="/tmp")
        os.chmod(self.work, 0o755)
        self.results = {"reference": {}, "mailstack": {}, "meta": {}, "profile": {}}
        self.sink_proc = None
        self.sink_port = None
        self.cleanups = []
        self.nameserver = None  # the local DNS server of the inbound checks (--features)
        self.mx_transform = None  # DKIM-signs the MX load messages (--features)

    def start_auth_dns(self) -> None:
        """``--features``: the local DNS server the inbound checks ask (``authdns``)."""
        auth = authdns.AuthDNS(self.work)
        self.cleanups.append(auth.stop)
        self.nameserver = auth.start()
        self.mx_transform = auth.sign
        log(f"local DNS server for the inbound checks on {self.nameserver}")

    # sink -------------------------------------------------------------------

    def start_sink(self):
        self.sink_proc, self.sink_port = start_sink()
        self.cleanups.append(self.stop_sink)

    def stop_sink(self):
        if self.sink_proc and self.sink_proc.poll() is None:
            self.sink_proc.terminate()
            self.sink_proc.wait(10)

    # reference ----------------------------------------------------------------

    def setup_reference(self):
        """Start private Postfix and Dovecot; a Side, or None (their rows say why)."""
        res = self.results["reference"]
        ok, why = refservers.available()
        if not ok or self.a.skip_reference:
            self.mark_side(res, why or "--skip-reference")
            return None
        pop_users = {u: PASSWORD for u in [POP_USER, BIG_USER] + USERS}
        pf = refservers.Postfix(self.work, USERS + [BIG30_USER], self.sink_port, ALIASES)
        dv = refservers.Dovecot(self.work, pop_users, pf.mailbase)
        self.cleanups.append(pf.stop)
        self.cleanups.append(dv.stop)
        log("starting Postfix and Dovecot")
        try:
            pf.start()
            dv.start()
        except Exception as e:  # noqa: BLE001
            log(f"reference servers did not start: {e}")
            self.mark_side(res, f"reference setup failed: {e}")
            return None
        self.results["meta"]["postfix_log"] = pf.log
        for k in ("queue_start", "queue_rss", "queue_list"):
            res[k] = na("mailstack only")
        t = Target("reference", pf.port, dv.port, pf.roots, dv.roots, pf.maildir, pf.submission_port,
                   mx_transform=self.mx_transform)
        return Side("reference", res, t, lambda u, n: self.fill_from_seed(pf.maildir(u), u, n, refservers.VUID),
                    pop3=True)

    def setup_mailstack(self):
        """Start mailstack and add the users; a Side, or None (its rows say why)."""
        res = self.results["mailstack"]
        if self.a.skip_mailstack:
            self.mark_side(res, "--skip-mailstack")
            return None
        ms = Mailstack(self.work, self.sink_port)
        self.cleanups.append(ms.kill)
        if self.a.features:
            self.enable_features(ms)
        if self.a.processes:
            ms.extra.setdefault("server", {})["processes"] = (
                self.a.processes if self.a.processes == "auto" else int(self.a.processes)
            )
        log("starting mailstack")
        try:
            self.start_mailstack(ms)
        except Exception as e:  # noqa: BLE001 - any failure: the whole side is n/a
            self.mark_side(res, f"mailstack did not start: {e}")
            return None
        try:
            self.setup_mailstack_users(ms)
        except Exception as e:  # noqa: BLE001
            self.mark_side(res, f"admin command failed: {e}")
            return None
        t = Target("mailstack", ms.ports["smtp"], ms.ports["pop3"], ms.roots, ms.roots, ms.maildir,
                   ms.ports["submission"], (SUBMIT_USER, PASSWORD), self.mx_transform)
        return Side("mailstack", res, t, lambda u, n: self.fill_from_seed(ms.maildir(u), u, n), ms=ms,
                    pop3=ms.pop3_enabled)

    def enable_features(self, ms: Mailstack) -> None:
        """``--features``: every optional feature whose config key this mailstack declares."""
        from mailstack import config

        declared = {k.dotted for k in config.KEYS}
        ms.extra, enabled, missing = feature_settings(declared, procmem.free_port, self.nameserver)
        self.results["meta"]["features"] = {"enabled": enabled, "missing": missing}
        log(f"--features: enabled {enabled or 'none'}; not available yet: {missing or 'none'}")

    def verify_features(self, sides: list) -> None:
        """After the accept and submit runs: did the inbound checks and the signing run?"""
        features = self.results["meta"].get("features")
        for side in sides:
            if side.ms is None or features is None:
                continue
            inbound = all(side.ms.extra.get("inbound", {}).get(k) for k in ("spf", "dkim", "dmarc"))
            signing = ("dkimsign" in side.ms.extra.get("pipeline", {}).get("checks", ())
                       and "na" not in side.res.get("submit1", {"na": ""}))
            problems = feature_problems(side.t, self.sink_port, self.work, inbound, signing)
            features["problems"] = problems
            log(f"features verified: {'; '.join(problems) or 'all ran'}")

    @staticmethod
    def mark_side(res: dict, why: str) -> None:
        for key, *_ in ROWS:
            if not key.startswith("fsync"):
                res.setdefault(key, na(why))

    def run_workloads(self, sides: list) -> None:
        """Each workload against every server back to back (reference first), so that
        the load of this shared machine drifts as little as possible within a pair."""
        for side in sides:
            self.guarded(side.res, "accept10", accept_workload, side.t, self.n, 10)
        for side in sides:
            self.guarded(side.res, "accept10c", source_accept_workload, side.t, self.n, 10)
        for side in sides:
            svg = None
            if side.ms is not None and self.a.profile:
                os.makedirs(self.a.profile, exist_ok=True)
                svg = os.path.join(os.path.abspath(self.a.profile), "mailstack-accept50.svg")
            self.guarded(side.res, "accept50", accept_workload, side.t, self.n, 50, svg,
                         side.ms.pid if side.ms else None)
            if svg and os.path.exists(os.path.splitext(svg)[0] + ".txt"):
                self.record_profile("accept50", svg, side.res.get("accept50", {}).get("seconds"))
            a50 = side.res.get("accept50", {})
            for row, field in (("mem50", "pss_process_mb"), ("mem50_total", "pss_mb")):
                side.res[row] = {"value": a50[field], "unit": "MB"} if field in a50 else na("no 50-session run")
        for side in sides:
            svg = None
            if side.ms is not None and self.a.profile:
                os.makedirs(self.a.profile, exist_ok=True)
                svg = os.path.join(os.path.abspath(self.a.profile), "mailstack-relay10.svg")
            self.guarded(side.res, "relay10", relay_workload, side.t, self.n, 10, self.sink_port, self.work, svg,
                         side.ms.pid if side.ms else None)
            if svg and os.path.exists(os.path.splitext(svg)[0] + ".txt"):
                self.record_profile("relay10", svg, side.res.get("relay10", {}).get("seconds"))
        for side in sides:
            self.guarded(side.res, "submit1", submit_workload, side.t, self.n_submit, 10, self.sink_port, self.work)
        if self.a.features:
            self.verify_features(sides)
        for side in sides:
            if self.quick:
                side.res["big30"] = na("skipped (--quick)")
            else:
                self.guarded(side.res, "big30", big_message, side.t, 30 * 1024 * 1024)
        for side in sides:
            if not side.pop3:
                side.res["pop3_download"] = na("mailstack POP3 listener not available yet")
            elif not self.selected("pop3_download"):
                side.res["pop3_download"] = na("not selected (--workloads)")
            else:
                self._pop_download(side.t, side.res, side.fill)
        for side in sides:
            if not side.pop3:
                side.res["pop3_uidl"] = na("mailstack POP3 listener not available yet")
            else:
                self._pop_uidl(side.t, side.res, side.fill)
        for side in sides:
            if side.ms is not None:
                if side.pop3:
                    self.profile_pop3(side.t, side.ms)
                self.queue_workload(side.ms, side.res)

    def start_mailstack(self, ms: Mailstack):
        try:
            ms.start()
            return
        except RuntimeError as e:
            first = str(e)
            log(f"mailstack did not start with POP3 ({first[:200]}); retrying without")
        ms.kill()
        ms.pop3_enabled = False
        ms.start()

    def setup_mailstack_users(self, ms: Mailstack):
        add_users(ms, USERS + [POP_USER] + ([] if self.quick else [BIG_USER, BIG30_USER]))

    # shared workloads -----------------------------------------------------------

    def selected(self, key: str) -> bool:
        return self.only is None or key in self.only or key.split("_")[0] in self.only

    def guarded(self, res: dict, key: str, f, *args, **kw):
        if not self.selected(key):
            res[key] = na("not selected (--workloads)")
            return
        log(f"{res is self.results['mailstack'] and 'mailstack' or 'reference'}: {key}")
        try:
            res[key] = f(*args, **kw)
        except Exception as e:  # noqa: BLE001 - a broken part makes its row n/a
            log(f"  {key} failed: {type(e).__name__}: {e}")
            if self.a.verbose:
                traceback.print_exc()
            res[key] = na(f"{type(e).__name__}: {e}")
        log(f"  -> {res[key]}")

    def record_profile(self, name: str, svg: str, seconds) -> None:
        prof = hotspots(os.path.splitext(svg)[0] + ".txt")
        prof.update({"svg": svg, "rate_hz": 200, "seconds": seconds})
        self.results["profile"][name] = prof

    def profile_pop3(self, t: Target, ms: Mailstack) -> None:
        """An extra, unmeasured POP3 download of 1000 messages under py-spy (after the
        measured runs, so sampling does not slow them)."""
        if not (self.a.profile and ms.pid and self.selected("pop3_download")):
            return
        log("mailstack: profiling a POP3 download (not measured)")
        try:
            self.fill_from_seed(ms.maildir(POP_USER), POP_USER, self.n_pop)
            svg = os.path.join(os.path.abspath(self.a.profile), "mailstack-pop3-download.svg")
            prof = start_profile(svg, ms.pid)
            t0 = time.monotonic()
            pop3client.full_download("127.0.0.1", t.pop3_port, POP_USER, PASSWORD)
            el = time.monotonic() - t0
            if prof:
                stop_profile(prof)
                self.record_profile("pop3_download", svg, round(el, 2))
        except Exception as e:  # noqa: BLE001
            log(f"  POP3 profile failed: {e}")

    def fill_from_seed(self, maildir: str, user: str, n: int, uid: int | None = None) -> None:
        """Give ``maildir`` the same n pre-generated messages as the other server got.

        The messages are written once into ``<work>/seed/<user>`` and hard-linked into
        each server's Maildir (owned by ``uid`` for Dovecot; mailstack runs as root).
        """
        seed = os.path.join(self.work, "seed", user.partition("@")[0])
        if not os.path.isdir(os.path.join(seed, "new")):
            log(f"writing {n} messages for {user}")
            # The big STAT/UIDL mailbox is one message linked n times (see fill_maildir).
            msggen.fill_maildir(seed, n, user, uid, uid, linked=(user == BIG_USER))
        msggen.link_maildir(seed, maildir)
        if uid is not None:
            msggen.chown_tree(maildir, uid, uid)

    def _pop_download(self, t: Target, res: dict, fill):
        try:
            fill(POP_USER, self.n_pop)
        except Exception as e:  # noqa: BLE001
            res["pop3_download"] = na(f"filling the Maildir failed: {e}")
        else:
            self.guarded(res, "pop3_download", pop3_download, t, POP_USER)

    def _pop_uidl(self, t: Target, res: dict, fill):
        if not self.n_big:
            res["pop3_uidl"] = na("skipped (--quick)")
            return
        if not self.selected("pop3_uidl"):
            res["pop3_uidl"] = na("not selected (--workloads)")
            return
        fill(BIG_USER, self.n_big)
        self.guarded(res, "pop3_uidl", pop3_uidl, t, BIG_USER)

    def queue_workload(self, ms: Mailstack, res: dict):
        if not self.n_queue or not self.selected("queue"):
            for k in ("queue_start", "queue_rss", "queue_list"):
                res[k] = na("skipped (--quick)" if not self.n_queue else "not selected (--workloads)")
            return
        ms.stop()
        where = "the data_dir's disk"
        if self.a.queue_tmpfs and os.path.isdir("/dev/shm"):
            # A fresh instance whose data_dir is on tmpfs: on a busy shared disk creating
            # 200k files can take minutes; start-up and `queue list` read envelopes
            # from the page cache either way.
            shm = tempfile.mkdtemp(prefix="msbq-", dir="/dev/shm")
            self.cleanups.append(lambda: shutil.rmtree(shm, ignore_errors=True))
            pop3 = ms.pop3_enabled
            ms = Mailstack(shm, self.sink_port)
            ms.pop3_enabled = pop3
            self.cleanups.append(ms.kill)
            where = "tmpfs (--queue-tmpfs)"
        log(f"mailstack: writing {self.n_queue} deferred messages into the queue on {where}")
        try:
            gen = fill_queue(os.path.join(ms.data_dir, "queue"), self.n_queue)
        except Exception as e:  # noqa: BLE001 - the queue store may not be there yet
            for k in ("queue_start", "queue_rss", "queue_list"):
                res[k] = na(f"could not fill the queue: {type(e).__name__}: {e}")
            ms.start()
            return
        log(f"  written in {gen:.1f} s; starting mailstack on it")
        try:
            start = ms.start(timeout=300)
        except Exception as e:  # noqa: BLE001
            for k in ("queue_start", "queue_rss", "queue_list"):
                res[k] = na(f"mailstack did not start with the queue: {e}")
            return
        res["queue_start"] = {"value": round(start, 2), "unit": "s", "queue_on": where, "fill_s": round(gen, 1)}
        # RSS once settled: sample until the manager logged "queue loaded" and RSS
        # stops growing (or 120 s).
        peak, last, stable, t0 = 0, 0, 0, time.monotonic()
        loaded_s = None
        while time.monotonic() - t0 < 120 and (stable < 10 or loaded_s is None):
            if loaded_s is None and "queue loaded" in _read(ms.log_path):
                loaded_s = round(time.monotonic() - ms.started_at, 2)
            cur = procmem.tree_rss(ms.roots())
            peak = max(peak, cur)
            stable = stable + 1 if abs(cur - last) < 1e6 else 0
            last = cur
            time.sleep(0.2)
        res["queue_start"]["loaded_s"] = loaded_s  # until the manager had scanned every envelope
        settled = round(time.monotonic() - t0, 1)
        res["queue_rss"] = {"value": round(peak / 1e6, 1), "unit": "MB", "settled_after_s": settled}
        log(f"  start {start:.2f} s, RSS {peak / 1e6:.0f} MB; timing queue list")
        t0 = time.monotonic()
        r = ms.admin("queue", "list", timeout=300)
        el = time.monotonic() - t0
        if r.returncode != 0:
            res["queue_list"] = na(f"queue list failed: {_last_line(r.stderr)}")
        else:
            lines = r.stdout.count("\n")
            res["queue_list"] = {"value": round(el, 2), "unit": "s", "lines": lines}
        log(f"  -> {res['queue_start']} {res['queue_rss']} {res['queue_list']}")

    # ------------------------------------------------------------------------------

    def run(self):
        t0 = time.time()
        self.results["meta"].update({
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "messages": self.n, "submit_messages": self.n_submit, "pop_messages": self.n_pop, "big_mailbox": self.n_big,
            "queue_messages": self.n_queue, "quick": self.quick, "cpus": os.cpu_count(),
            "machine": machine(), "work": self.work,
        })
        try:
            self.start_sink()
            if self.a.features:
                self.start_auth_dns()
            secs = 0.5 if self.quick else 2.0
            self.guarded(self.results["reference"], "fsync1", fsync_ceiling, self.work, 1, secs)
            self.guarded(self.results["reference"], "fsync16", fsync_ceiling, self.work, 16, secs)
            sides = [side for side in (self.setup_reference(), self.setup_mailstack()) if side is not None]
            self.run_workloads(sides)
            for side in sides:
                if side.ms is not None:
                    self.results["meta"]["mailstack_exit"] = side.ms.stop()
        except KeyboardInterrupt:
            # SIGTERM/^C: stop the servers, then still print what was measured.
            log("interrupted: reporting what was measured so far")
            self.results["meta"]["interrupted"] = True
            for side in ("reference", "mailstack"):
                for key, *_ in ROWS:
                    self.results[side].setdefault(key, na("interrupted"))
        finally:
            for c in reversed(self.cleanups):
                try:
                    c()
                except Exception as e:  # noqa: BLE001
                    log(f"cleanup: {e}")
            self.results["meta"]["seconds"] = round(time.time() - t0, 1)
        return self.results

    def remove_work(self):
        if self.a.keep:
            log(f"kept {self.work}")
            return
        # rm -rf is much faster than shutil.rmtree on the 300k files of a full run;
        # a second SIGTERM must not leave half a folder behind.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.run(["rm", "-rf", "--one-file-system", self.work], stdin=subprocess.DEVNULL)
        shutil.rmtree(self.work, ignore_errors=True)


def add_users(ms: Mailstack, users: list[str]) -> None:
    """``users`` (password PASSWORD) and ALIASES through the admin command.

    The first user goes through ``python -m mailstack user add`` as an operator
    would type it; the others through the same command's ``main()`` in one
    process (each command start costs ~1-2 s of imports on a busy 2-core box).
    """
    log(f"adding {len(users)} users and {len(ALIASES)} aliases with the admin command")
    r = ms.admin("user", "add", users[0], "--password-stdin", input=PASSWORD + "\n")
    if r.returncode != 0 and "exist" not in r.stderr:
        raise RuntimeError(f"user add {users[0]}: {_last_line(r.stderr)}")
    cmds = [["user", "add", u, "--password-stdin"] for u in users[1:]]
    cmds += [["alias", "add", a, t] for a, t in ALIASES.items()]
    script = (
        "import io, json, sys\n"
        "from mailstack.admin.cli import main\n"
        "cfg, pw, cmds = json.loads(sys.stdin.read())\n"
        "for c in cmds:\n"
        "    err = io.StringIO()\n"
        "    rc = main(['--config', cfg] + c, stdin=io.StringIO(pw + '\\n'), stdout=io.StringIO(), stderr=err)\n"
        "    if rc and 'exist' not in err.getvalue():\n"
        "        print(' '.join(c[:3]) + ': ' + err.getvalue().strip(), file=sys.stderr)\n"
        "        sys.exit(1)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], input=json.dumps([ms.config_path, PASSWORD, cmds]),
                       capture_output=True, text=True, cwd=ms.root, env=ms_env(), timeout=300)
    if r.returncode != 0:
        raise RuntimeError(_last_line(r.stderr))


def start_sink() -> tuple[subprocess.Popen, int]:
    """The counting sink (sink.py) on a free port: (process, port)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "sink.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise RuntimeError("sink did not start")
    return proc, int(line.split()[1])


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip()[:200] if lines else "(no output)"


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Linux {os.uname().release}, Python {sys.version.split()[0]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="mailstack vs Postfix/Dovecot benchmark")
    p.add_argument("--messages", type=int, default=0, help="messages per SMTP workload (default 5000; 40 with --quick)")
    p.add_argument("--pop-messages", type=int, default=0, help="messages for the POP3 download (default 5000)")
    p.add_argument("--queue-messages", type=int, default=100000, help="deferred messages for the queue workload")
    p.add_argument("--big-mailbox", type=int, default=50000, help="messages in the POP3 STAT/UIDL mailbox")
    p.add_argument("--workloads", help="comma-separated subset: accept10,accept10c,accept50,relay10,submit1,pop3,"
                   "pop3_download,pop3_uidl,big30,queue,fsync1,fsync16 (default: all)")
    p.add_argument("--queue-tmpfs", action="store_true",
                   help="put the 100k-message queue on /dev/shm (bounded set-up time on a busy disk)")
    p.add_argument("--quick", action="store_true", help="tens of messages; skip 50k/100k/30 MB workloads")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--features", action="store_true",
                   help="mailstack with every optional feature whose config key exists (DKIM, inbound checks, metrics)")
    p.add_argument("--processes", default="",
                   help='mailstack [server] processes: "auto" or a number (default: the config default)')
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy profiles of mailstack: 50-session and relay runs, and an extra POP3 download")
    p.add_argument("--workdir", default=None, help="parent of the temp folder (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, configs)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-mailstack", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    run = Run(a)
    try:
        results = run.run()
        report(results, a)
    finally:
        run.remove_work()
    return 1 if results["meta"].get("features", {}).get("problems") else 0


def report(results: dict, a) -> None:
    text = table(results)
    print(f"\nmailstack benchmark, {results['meta']['date']}, {results['meta']['machine']}")
    print(f"{results['meta']['messages']} messages of ~4 KB per SMTP workload "
          f"({results['meta']['submit_messages']} for submit1), one per connection; "
          f"POP3 download of {results['meta']['pop_messages']}; run took {results['meta']['seconds']} s\n")
    print(text)
    for name, prof in results["profile"].items():
        secs = prof.get("seconds") or 0
        print(f"\nmailstack profile, {name} (py-spy, {prof['rate_hz']} Hz, non-idle samples, {secs} s): {prof['svg']}")
        for group in ("reactor", "pool", "all"):
            g = prof.get(group)
            if not g:
                continue
            share = 100.0 * g["samples"] / (prof["rate_hz"] * secs) if secs else 0
            busy = f", ~{share:.0f}% of the run" if secs and group == "reactor" else ""
            print(f"  {group} thread{'s' if group == 'pool' else ''}: {g['samples']} samples{busy}")
            print("    self:      " + "; ".join(f"{k} {v}%" for k, v in g["self"][:8]))
            print("    inclusive: " + "; ".join(f"{k} {v}%" for k, v in g["inclusive"][:8]))
    results["table"] = text
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
