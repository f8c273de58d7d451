"""SMTP load client: N concurrent sessions, one message per connection.

Each session: connect, 220, EHLO, [STARTTLS, EHLO], [AUTH PLAIN], MAIL, RCPT, DATA, the message, 250, QUIT.
It records for every message the DATA-to-250 latency (from sending ``DATA`` to the
final reply after the terminating dot) and the Message-IDs that got a 2xx, so a run
can check afterwards that every acknowledged message arrived.

Usable as a library (``asyncio.run(run_load(...))``) or from the command line::

    python3 benchmarks/loadclient.py --port 2525 --messages 1000 --sessions 50 \\
        --rcpt 'user{i}@bench.test' --users 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field


class SMTPError(Exception):
    pass


@dataclass
class LoadResult:
    sent: int = 0  # messages that got 2xx after DATA
    failed: int = 0  # sessions that failed (any error)
    errors: dict[str, int] = field(default_factory=dict)  # first line of each error -> count
    latencies: list[float] = field(default_factory=list)  # seconds, DATA-to-250, acked only
    acked_ids: list[str] = field(default_factory=list)
    start: float = 0.0  # time.time() at start
    end: float = 0.0  # time.time() when the last session ended
    last_ack: float = 0.0  # time.time() of the last 250

    @property
    def elapsed(self) -> float:
        return self.end - self.start

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float) -> float | None:
        return percentile(self.latencies, p)

    def summary(self) -> dict:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed, 3),
            "accept_msg_per_s": round(self.rate, 1),
            "p50_ms": _ms(self.percentile(50)),
            "p99_ms": _ms(self.percentile(99)),
        }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise SMTPError(f"bad reply {lines[-1][:60]!r}") from None
    return code, b"".join(lines)


async def _expect(reader, want: int, what: str) -> bytes:
    code, text = await _reply(reader)
    if code // 100 != want:
        raise SMTPError(f"{what}: {text.splitlines()[0].decode('ascii', 'replace')[:80]}")
    return text


@functools.cache
def _client_tls():
    """One client context for the whole run: building one loads the system's CA
    bundle (tens of milliseconds), which made the client the bottleneck of submit1."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def dot_stuff(msg: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency, plus the terminating ``.``."""
    if msg.startswith(b"."):
        msg = b"." + msg
    msg = msg.replace(b"\r\n.", b"\r\n..")
    if not msg.endswith(b"\r\n"):
        msg += b"\r\n"
    return msg + b".\r\n"


async def send_one(
    host: str,
    port: int,
    sender: str,
    rcpt: str,
    payload: bytes,
    auth: tuple[str, str] | None = None,
    timeout: float = 120.0,
    starttls: bool = False,
) -> float:
    """One session, one message; returns the DATA-to-250 latency in seconds.

    ``payload`` is already dot-stuffed and terminated (see ``dot_stuff``).
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout)
    try:
        async with asyncio.timeout(timeout):
            await _expect(reader, 2, "greeting")
            writer.write(b"EHLO loadclient.bench.test\r\n")
            await _expect(reader, 2, "EHLO")
            if starttls:  # RFC 3207; the servers' certificates are throwaway, so not verified
                writer.write(b"STARTTLS\r\n")
                await _expect(reader, 2, "STARTTLS")
                await writer.start_tls(_client_tls())
                writer.write(b"EHLO loadclient.bench.test\r\n")
                await _expect(reader, 2, "EHLO after STARTTLS")
            if auth:
                token = base64.b64encode(b"\0" + auth[0].encode() + b"\0" + auth[1].encode())
                writer.write(b"AUTH PLAIN " + token + b"\r\n")
                await _expect(reader, 2, "AUTH")
            writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
            await _expect(reader, 2, "MAIL")
            writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            await _expect(reader, 2, "RCPT")
            t0 = time.perf_counter()
            writer.write(b"DATA\r\n")
            await _expect(reader, 3, "DATA")
            writer.write(payload)
            await _expect(reader, 2, "end of data")
            latency = time.perf_counter() - t0
            writer.write(b"QUIT\r\n")
            try:
                await asyncio.wait_for(_reply(reader), 5)
            except (TimeoutError, SMTPError, OSError):
                pass
            return latency
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def run_load(
    host: str,
    port: int,
    messages: int,
    sessions: int,
    rcpt_for,
    sender: str = "loadclient@client.test",
    size: int = 4096,
    auth_for=None,
    body: bytes | None = None,
    timeout: float = 120.0,
    starttls: bool = False,
    transform=None,
) -> LoadResult:
    """Send ``messages`` messages over ``sessions`` concurrent one-message connections.

    ``rcpt_for(i)`` gives the recipient of message i; ``auth_for(i)`` (optional) a
    (user, password) pair for AUTH PLAIN; ``starttls``: STARTTLS before it.  ``body``: one fixed message instead of
    generated ~``size``-byte ones (for the 30 MB test).  ``transform(message)`` (optional)
    rewrites each generated message before the clock starts (to DKIM-sign it, say).
    """
    from msggen import make_message

    res = LoadResult()
    # Pre-generate payloads so the client spends its time on the wire, not on formatting.
    payloads = []
    for i in range(messages):
        rcpt = rcpt_for(i)
        if body is None:
            msgid, msg = make_message(sender, rcpt, size)
            if transform is not None:
                msg = transform(msg)
        else:
            msgid, msg = f"<big{i}@bench.test>", body
        payloads.append((rcpt, msgid, dot_stuff(msg)))
    next_i = 0

    async def worker():
        nonlocal next_i
        while next_i < messages:
            i = next_i
            next_i += 1
            rcpt, msgid, payload = payloads[i]
            try:
                lat = await send_one(
                    host, port, sender, rcpt, payload, auth_for(i) if auth_for else None, timeout, starttls
                )
            except (TimeoutError, SMTPError, OSError) as e:
                res.failed += 1
                key = f"{type(e).__name__}: {e}"[:100]
                res.errors[key] = res.errors.get(key, 0) + 1
                continue
            res.sent += 1
            res.latencies.append(lat)
            res.acked_ids.append(msgid)
            res.last_ack = time.time()

    res.start = time.time()
    await asyncio.gather(*(worker() for _ in range(min(sessions, messages))))
    res.end = time.time()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--sender", default="loadclient@client.test")
    p.add_argument("--rcpt", default="user{i}@bench.test", help="format with {i} = message number mod --users")
    p.add_argument("--users", type=int, default=1)
    p.add_argument("--auth", help="user:password for AUTH PLAIN")
    p.add_argument("--starttls", action="store_true", help="STARTTLS after EHLO")
    p.add_argument("--ids", help="write acked Message-IDs to this file")
    a = p.parse_args(argv)
    auth = tuple(a.auth.split(":", 1)) if a.auth else None
    res = asyncio.run(
        run_load(
            a.host, a.port, a.messages, a.sessions, lambda i: a.rcpt.format(i=i % a.users), a.sender, a.size,
            (lambda i: auth) if auth else None, starttls=a.starttls,
        )
    )
    if a.ids:
        with open(a.ids, "w") as f:
            f.write("\n".join(res.acked_ids) + "\n")
    print(json.dumps(res.summary(), indent=1))
    return 0 if res.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
