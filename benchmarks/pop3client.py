"""POP3 client workloads (blocking sockets, one command at a time, no pipelining).

``full_download``: USER/PASS, STAT, UIDL, RETR + DELE every message, QUIT (waits for
the +OK of QUIT, i.e. until the server has removed the messages).
``stat_uidl``: USER/PASS, STAT, UIDL, QUIT.

Both return a dict with ``seconds`` (wall time from connect to the QUIT reply),
``messages`` and ``bytes``.  Login is USER/PASS (RFC 1939), which every server here
supports on loopback without TLS; ``mech="plain"`` uses AUTH PLAIN (RFC 5034).
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import time


class POP3Error(Exception):
    pass


class Client:
    def __init__(self, host: str, port: int, timeout: float = 120.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb", buffering=1 << 16)
        self.greeting = self._status("greeting")

    def _status(self, what: str) -> bytes:
        line = self.f.readline()
        if not line.startswith(b"+OK"):
            raise POP3Error(f"{what}: {line[:80]!r}")
        return line

    def cmd(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self._status(line.split()[0])

    def multi(self, line: str) -> list[bytes]:
        """A multi-line command; returns the lines without CRLF, dot-unstuffed."""
        self.cmd(line)
        out = []
        readline = self.f.readline
        while True:
            got = readline()
            if got == b".\r\n":
                return out
            if not got:
                raise POP3Error(f"{line}: connection closed")
            if got.startswith(b"."):
                got = got[1:]
            out.append(got)

    def login(self, user: str, password: str, mech: str = "user") -> None:
        if mech == "plain":
            tok = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
            self.cmd(f"AUTH PLAIN {tok}")
        else:
            self.cmd(f"USER {user}")
            self.cmd(f"PASS {password}")

    def close(self):
        try:
            self.f.close()
        finally:
            self.sock.close()


def _login_stat_uidl(c: Client, user, password, mech) -> int:
    """Log in, STAT and UIDL; the message count (UIDL must list them all)."""
    c.login(user, password, mech)
    n = int(c.cmd("STAT").split()[1])
    uidl = c.multi("UIDL")
    if len(uidl) != n:
        raise POP3Error(f"UIDL listed {len(uidl)} of {n} messages")
    return n


def full_download(host, port, user, password, mech="user") -> dict:
    t0 = time.perf_counter()
    c = Client(host, port)
    try:
        n = _login_stat_uidl(c, user, password, mech)
        total = 0
        for i in range(1, n + 1):
            total += sum(len(x) for x in c.multi(f"RETR {i}"))
            c.cmd(f"DELE {i}")
        c.cmd("QUIT")
    finally:
        c.close()
    return {"seconds": time.perf_counter() - t0, "messages": n, "bytes": total}


def stat_uidl(host, port, user, password, mech="user") -> dict:
    t0 = time.perf_counter()
    c = Client(host, port)
    try:
        n = _login_stat_uidl(c, user, password, mech)
        c.cmd("QUIT")
    finally:
        c.close()
    return {"seconds": time.perf_counter() - t0, "messages": n, "bytes": 0}


def main(argv=None):
    p = argparse.ArgumentParser(description="POP3 workloads")
    p.add_argument("workload", choices=["download", "stat-uidl"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--mech", default="user", choices=["user", "plain"])
    a = p.parse_args(argv)
    f = full_download if a.workload == "download" else stat_uidl
    print(json.dumps(f(a.host, a.port, a.user, a.password, a.mech)))


if __name__ == "__main__":
    sys.exit(main())
