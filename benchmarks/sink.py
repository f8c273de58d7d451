"""A fast counting SMTP sink (asyncio), the remote end of the relay workload.

Accepts everything, several messages per connection, with PIPELINING; writes
nothing to disk.  It counts messages, keeps the time of the first and last one and
each message's Message-ID.  The benchmark talks to it over the same port with three
extra commands::

    XCOUNT          -> 250 <count> <first time> <last time>   (time.time() values)
    XRESET          -> 250 (forget everything)
    XDUMP <path>    -> 250 (write the Message-IDs seen, one a line)
    XLAST <path>    -> 250 (write the last message received, as received)

STARTTLS (RFC 3207) is offered with a throwaway self-signed certificate unless
``--no-tls``: mailstack's client insists on it at a smarthost, and the Postfix
reference is configured to use it too, so both relay over TLS.

Run: ``python3 benchmarks/sink.py --port 2600`` (prints ``READY <port>`` when listening).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time

_MSGID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.I | re.M)


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.ids: list[str] = []
        self.last_message = b""
        self.connections = 0


STATS = Stats()
EHLO = (
    b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n"
)
EHLO_TLS = EHLO.replace(b"250-SIZE 0\r\n", b"250-SIZE 0\r\n250-STARTTLS\r\n")
TLS_CONTEXT = None  # ssl.SSLContext when STARTTLS is offered


def self_signed_pem(hostname: str) -> bytes:
    """A fresh EC key and a self-signed certificate for ``hostname``, PEM (key first)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))


def make_tls_context():
    """A server SSLContext with a fresh self-signed certificate for sink.bench.test."""
    import os
    import ssl
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sink.pem")
        with open(path, "wb") as f:
            f.write(self_signed_pem("sink.bench.test"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(path)
    return ctx


class SinkProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""
        self.in_data = False
        self.tls = False
        self.upgrading = False
        STATS.connections += 1
        transport.write(b"220 sink.bench.test ESMTP sink\r\n")

    def data_received(self, data):
        self.buf += data
        if self.upgrading:
            return
        out = []
        while True:
            if self.in_data:
                # The message ends at CRLF.CRLF; the DATA body begins right after
                # the 354, so an empty message is just ".\r\n".
                if self.buf.startswith(b".\r\n"):
                    end, body = 3, b""
                else:
                    i = self.buf.find(b"\r\n.\r\n")
                    if i < 0:
                        break
                    end, body = i + 5, self.buf[: i + 2]
                self.buf = self.buf[end:]
                self.in_data = False
                now = time.time()
                if not STATS.count:
                    STATS.first = now
                STATS.count += 1
                STATS.last = now
                STATS.last_message = body
                hdr_end = body.find(b"\r\n\r\n")
                m = _MSGID.search(body, 0, hdr_end if hdr_end >= 0 else len(body))
                if m:
                    STATS.ids.append(m.group(1).decode("ascii", "replace"))
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            i = self.buf.find(b"\r\n")
            if i < 0:
                if len(self.buf) > 65536:
                    self.transport.close()
                break
            line, self.buf = self.buf[:i], self.buf[i + 2 :]
            verb = line[:4].upper()
            if verb in (b"EHLO",):
                out.append(EHLO_TLS if TLS_CONTEXT is not None and not self.tls else EHLO)
            elif verb == b"STAR" and TLS_CONTEXT is not None and not self.tls:
                out.append(b"220 2.0.0 Ready to start TLS\r\n")
                self.transport.write(b"".join(out))
                self.upgrading = True
                self.buf = b""  # RFC 3207 section 4.2: nothing before the handshake counts
                asyncio.ensure_future(self._starttls())
                return
            elif verb == b"HELO":
                out.append(b"250 sink.bench.test\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            elif verb == b"XCOU":
                out.append(f"250 {STATS.count} {STATS.first:.6f} {STATS.last:.6f}\r\n".encode())
            elif verb == b"XRES":
                STATS.reset()
                out.append(b"250 reset\r\n")
            elif verb == b"XDUM":
                path = line[6:].decode()
                with open(path, "w") as f:
                    f.write("\n".join(STATS.ids) + "\n")
                out.append(b"250 dumped\r\n")
            elif verb == b"XLAS":
                with open(line[6:].decode(), "wb") as f:
                    f.write(STATS.last_message)
                out.append(b"250 written\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"STAR":
                out.append(b"454 4.7.0 TLS not available\r\n")
            else:
                out.append(b"502 5.5.2 Command not implemented\r\n")
        if out:
            self.transport.write(b"".join(out))


    async def _starttls(self):
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, TLS_CONTEXT, server_side=True)
        except Exception:  # noqa: BLE001 - a failed handshake just ends the session
            self.transport.close()
            return
        self.tls = True
        self.upgrading = False
        self.in_data = False
        if self.buf:
            self.data_received(b"")


async def serve(port: int, host: str = "127.0.0.1"):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, host, port, backlog=1024, reuse_address=True)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def control(port: int, command: str, host: str = "127.0.0.1") -> str:
    """Send one X command to a running sink; returns the reply line after 250."""
    import socket

    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(command.encode() + b"\r\nQUIT\r\n")
        line = f.readline().decode().strip()
        if not line.startswith("250"):
            raise RuntimeError(f"sink said {line!r} to {command!r}")
        return line[4:]


def count(port: int) -> tuple[int, float, float]:
    n, first, last = control(port, "XCOUNT").split()
    return int(n), float(first), float(last)


def main(argv=None):
    p = argparse.ArgumentParser(description="counting SMTP sink")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--no-tls", action="store_true", help="do not offer STARTTLS")
    a = p.parse_args(argv)
    global TLS_CONTEXT
    if not a.no_tls:
        TLS_CONTEXT = make_tls_context()
    try:
        asyncio.run(serve(a.port, a.host))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
