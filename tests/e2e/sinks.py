"""Helpers for the issue-6 end-to-end tests: a threaded SMTP sink and a raw SMTP client.

``Sink`` is a minimal SMTP server on loopback that records every message it
accepts (optionally slowly, to keep deliveries in flight when the server is
killed).  ``RawSMTP`` speaks bytes, so tests can send what smtplib refuses to
(8-bit addresses, odd paths).
"""

from __future__ import annotations

import email
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

_TLS_CONTEXT: ssl.SSLContext | None = None


def _server_context() -> ssl.SSLContext:
    """A self-signed server context for the sink's STARTTLS (the smarthost path requires TLS)."""
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        from mailstack.tls import generate_self_signed

        d = tempfile.mkdtemp(prefix="mailstack-sink-tls-")
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        generate_self_signed("sink.test", cert, key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        _TLS_CONTEXT = ctx
    return _TLS_CONTEXT


class Sink:
    """A threaded SMTP server on ``ip:port``; ``messages`` holds (sender, rcpts, data).

    PIPELINING-safe; STARTTLS offered unless ``starttls=False`` (with
    ``tls_context``'s certificate, default a self-signed one for sink.test);
    AUTH PLAIN/LOGIN offered when ``auth`` and accepted with any credentials;
    every command line is recorded in ``commands``; recipients in
    ``reject`` get 550 5.1.1; ``delay`` seconds pass before each message's
    final 250.  Listens at once unless ``start=False``; ``stop()`` and
    ``start()`` again reuse the same port (an MX going down and coming back).
    """

    def __init__(
        self,
        delay: float = 0.0,
        ip: str = "127.0.0.1",
        port: int = 0,
        reject: tuple[str, ...] = (),
        starttls: bool = True,
        start: bool = True,
        tls_context: ssl.SSLContext | None = None,
        auth: bool = False,
    ) -> None:
        self.delay = delay
        self.ip = ip
        self.port = port
        self.reject = reject
        self.starttls = starttls
        self.tls_context = tls_context
        self.auth = auth
        self.commands: list[str] = []
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._sock: socket.socket | None = None
        if start:
            self.start()

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.ip, self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self._sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)  # close() alone leaves makefile()'s reference open
                c.close()
            except OSError:
                pass

    close = stop

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            f = conn.makefile("rb")
            send = conn.sendall
            send(b"220 sink.test ESMTP\r\n")
            sender, rcpts = "", []
            tls = False
            while True:
                line = f.readline()
                if not line:
                    return
                cmd = line.rstrip(b"\r\n").decode("utf-8", "replace")
                with self._lock:
                    self.commands.append(cmd)
                verb = cmd[:4].upper()
                if verb == "EHLO":
                    starttls = b"250-STARTTLS\r\n" if self.starttls and not tls else b""
                    auth = b"250-AUTH PLAIN LOGIN\r\n" if self.auth else b""
                    send(
                        b"250-sink.test\r\n250-PIPELINING\r\n"
                        + starttls
                        + auth
                        + b"250-8BITMIME\r\n250 SIZE 50000000\r\n"
                    )
                elif verb == "AUTH" and self.auth:
                    send(b"235 2.7.0 Authentication successful\r\n")
                elif verb == "STAR" and self.starttls and not tls:
                    send(b"220 2.0.0 Ready to start TLS\r\n")
                    conn = (self.tls_context or _server_context()).wrap_socket(conn, server_side=True)
                    with self._lock:
                        self._conns.append(conn)
                    f = conn.makefile("rb")
                    send = conn.sendall
                    tls = True
                elif verb == "HELO":
                    send(b"250 sink.test\r\n")
                elif verb == "MAIL":
                    sender, rcpts = cmd[10:].split(">")[0].lstrip("<"), []
                    send(b"250 2.1.0 Ok\r\n")
                elif verb == "RCPT":
                    addr = cmd[8:].split(">")[0].lstrip("<")
                    if addr in self.reject:
                        send(b"550 5.1.1 <" + addr.encode() + b">: Recipient address rejected\r\n")
                    else:
                        rcpts.append(addr)
                        send(b"250 2.1.5 Ok\r\n")
                elif verb == "DATA":
                    if not rcpts:
                        send(b"554 5.5.1 No valid recipients\r\n")
                        continue
                    send(b"354 go ahead\r\n")
                    chunks = []
                    while True:
                        chunk = f.readline()
                        if not chunk:
                            return
                        if chunk == b".\r\n":
                            break
                        chunks.append(chunk[1:] if chunk.startswith(b".") else chunk)
                    if self.delay:
                        time.sleep(self.delay)
                    with self._lock:
                        self.messages.append((sender, list(rcpts), b"".join(chunks)))
                    send(b"250 2.0.0 Ok: queued\r\n")
                elif verb in ("RSET", "NOOP"):
                    send(b"250 2.0.0 Ok\r\n")
                elif verb == "QUIT":
                    send(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    send(b"502 5.5.2 Error\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def snapshot(self) -> list[tuple[str, list[str], bytes]]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, marker: bytes, timeout: float = 30.0) -> list[tuple[str, list[str], bytes]]:
        """The messages containing ``marker``, waiting up to ``timeout`` for one."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.snapshot() if marker in m[2]]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


class RawSMTP:
    """A byte-level SMTP client: ``cmd(b"RCPT TO:<x>")`` returns the final reply line."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.sock.makefile("rb")
        self.banner = self.reply()

    def reply(self) -> bytes:
        """The last line of the next reply (multi-line replies are read to the end)."""
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return line.rstrip(b"\r\n")

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def maildir_messages(maildir: str) -> Iterator[bytes]:
    """The bytes of every message in a Maildir (new/ and cur/); files that go
    away while listed (a POP3 session deleting) are skipped."""
    for sub in ("new", "cur"):
        folder = os.path.join(maildir, sub)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    yield f.read()
            except FileNotFoundError:
                continue


def message_ids_in(maildir: str) -> list[str]:
    """Message-IDs of every message in a Maildir (new/ and cur/), duplicates included."""
    found = []
    for data in maildir_messages(maildir):
        msg = email.message_from_bytes(data)
        if msg["Message-ID"]:
            found.append(msg["Message-ID"].strip())
    return found


def queue_state(server: Any) -> list[dict]:
    r = server.admin("queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
