"""End to end: the open-relay matrix on the MX listener of a real ``twistd mailstack``.

Local domains are ``localhost`` and ``bücher.test`` (configured as its A-label);
everything outbound goes to a counting sink (``relay.smarthost``), so a relay
that slipped through would show up there.  Each row is one unauthenticated
session claiming a local sender: RCPT must be refused with exactly the
documented code (550 5.7.1 relay, 550 5.1.1 unknown local, 501 5.1.3 syntax),
DATA must then find no recipient, and at the end the queue is empty and the
sink has received nothing but an authorised barrier message sent after them.
The positive rows show that the same addresses are accepted where they should be: local delivery on the MX, and relaying
for an authenticated user on submission.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time

import pytest

from tests.e2e.harness import Server
from tests.e2e.sinks import RawSMTP, Sink

PASSWORD = "matrix-pw"

RELAY = b"550 5.7.1"
UNKNOWN = b"550 5.1.1"
SYNTAX = b"501 5.1.3"

# (name, RCPT TO argument, expected reply code + enhanced code)
NEEDS_SMTPUTF8 = b"553 5.6.7"  # RFC 6531: a non-ASCII path in a transaction without SMTPUTF8
MATRIX = [
    ("plain remote", b"<user@remote.example>", RELAY),
    ("percent hack", b"<user%remote.example@localhost>", UNKNOWN),
    ("percent hack, quoted", b'<"user%remote.example"@localhost>', UNKNOWN),
    ("double percent", b"<user%remote.example%localhost@localhost>", UNKNOWN),
    ("source route via local", b"<@localhost:user@remote.example>", RELAY),
    ("source route, two hops", b"<@localhost,@localhost:user@remote.example>", RELAY),
    ("quoted local part with @", b'<"user@remote.example"@localhost>', UNKNOWN),
    ("unquoted double @", b"<user@remote.example@localhost>", SYNTAX),
    ("bang path", b"<remote.example!user@localhost>", UNKNOWN),
    ("bang path without domain", b"<remote.example!user>", SYNTAX),
    ("trailing dot remote", b"<user@remote.example.>", SYNTAX),
    ("trailing dot local", b"<user@localhost.>", SYNTAX),
    ("trailing dot local, known user", b"<alice@localhost.>", SYNTAX),
    ("IPv4 literal of this host", b"<user@[127.0.0.1]>", RELAY),
    ("IPv4 literal, known user", b"<alice@[127.0.0.1]>", RELAY),
    ("IPv6 literal", b"<user@[IPv6:::1]>", RELAY),
    ("bad IPv4 literal", b"<user@[127.0.0.300]>", SYNTAX),
    ("uppercase remote", b"<USER@REMOTE.EXAMPLE>", RELAY),
    ("uppercase local, percent hack", b"<user%remote.example@LOCALHOST>", UNKNOWN),
    ("mixed case local, bang", b"<Remote.Example!User@LocalHost>", UNKNOWN),
    ("IDNA local A-label, percent hack", b"<user%remote.example@XN--BCHER-KVA.test>", UNKNOWN),
    ("IDNA local U-label (8-bit, no SMTPUTF8)", "<user%remote.example@bücher.test>".encode(), NEEDS_SMTPUTF8),
    ("IDNA remote A-label", b"<user@xn--bcher-kva.example>", RELAY),
    ("IDNA remote U-label (8-bit)", "<user@bücher.example>".encode(), NEEDS_SMTPUTF8),
    ("fullwidth localhost (8-bit)", "<user@ｌｏｃａｌｈｏｓｔ>".encode(), NEEDS_SMTPUTF8),
    ("postmaster of a remote domain", b"<postmaster@remote.example>", RELAY),
    ("local user at remote subdomain", b"<alice@localhost.remote.example>", RELAY),
    ("remote domain that ends like local", b"<alice@notlocalhost>", RELAY),
    ("NUL in path", b"<user@remote.example\x00@localhost>", SYNTAX),
    ("unknown local user", b"<nobody@localhost>", UNKNOWN),
    ("no angle brackets", b"user@remote.example", SYNTAX),
    ("empty path", b"<>", SYNTAX),
]

# Accepted without authentication: mail *for* us, not relaying.
LOCAL_OK = [
    ("known user", b"<alice@localhost>"),
    ("known user, uppercase domain", b"<alice@LOCALHOST>"),
    ("known user, uppercase local part", b"<ALICE@localhost>"),
    ("source route ending here", b"<@remote.example:alice@localhost>"),
    ("postmaster without domain", b"<postmaster>"),
    ("postmaster of the IDNA domain", b"<postmaster@xn--bcher-kva.test>"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    sink = Sink()
    server = Server(
        tmp_path_factory.mktemp("relay-matrix"),
        extra_toml=(
            '[domains]\nlocal = ["localhost", "xn--bcher-kva.test"]\n'
            f'[relay]\nsmarthost = "127.0.0.1:{sink.port}"\nretry_intervals = ["1s"]\n'
        ),
    )
    r = server.admin("user", "add", "alice@localhost", "--password-stdin", input=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    server.start()
    yield server, sink
    server.kill()
    sink.close()


def queue_ids(server: Server) -> list[str]:
    r = server.admin("queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    return [row["id"] for row in json.loads(r.stdout)]


def test_relayMatrixRefused(env) -> None:
    """Every relay trick is refused at RCPT with its exact code on the unauthenticated MX listener;
    DATA afterwards has no recipient (554 5.5.1, or 503 5.5.1 after a syntax error); nothing is
    queued and nothing reaches the sink."""
    server, sink = env
    failures = []
    for name, path, expected in MATRIX:
        c = RawSMTP(server.ports["smtp"])
        try:
            assert c.cmd(b"EHLO attacker.test").startswith(b"250")
            assert c.cmd(b"MAIL FROM:<alice@localhost>").startswith(b"250 2.1.0")
            got = c.cmd(b"RCPT TO:" + path)
            if not got.startswith(expected):
                failures.append(f"{name}: RCPT TO:{path!r} -> {got!r}, expected {expected!r}")
            data = c.cmd(b"DATA")
            if not data.startswith((b"554 5.5.1", b"503 5.5.1")):
                failures.append(f"{name}: DATA -> {data!r}, expected 554 5.5.1 (or 503 5.5.1)")
                if data.startswith(b"354"):
                    c.cmd(b"Subject: relay\r\n\r\nrelay test\r\n.")
            c.cmd(b"QUIT")
        finally:
            c.close()
    assert not failures, "\n".join(failures)
    # A barrier instead of a pause: an authorised relay submitted after every row.  Once it
    # has reached the sink and the queue is empty, whatever a row had got committed has been
    # delivered too, so the sink must hold the barrier alone.
    rcpt, _ = submit_relay(server, "<matrix-barrier@test>")
    assert rcpt == (250, b"2.1.5 Recipient ok")
    assert sink.wait_for(b"<matrix-barrier@test>"), server.diagnostics()
    wait_until_queue_empty(server)
    got = sink.snapshot()
    assert [(s, r) for s, r, _ in got] == [("alice@localhost", ["user@remote.example"])], got
    sink.messages.clear()  # the sink is idle: the later tests start from an empty one


def submit_relay(server: Server, message_id: str) -> tuple[tuple[int, bytes], int]:
    """Alice relays to user@remote.example on submission (STARTTLS + AUTH): (RCPT reply, DATA code)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=20) as c:
        c.starttls(context=ctx)
        c.login("alice@localhost", PASSWORD)
        c.mail("alice@localhost")
        rcpt = c.rcpt("user@remote.example")
        code, _ = c.data(f"Subject: authorised relay\r\nMessage-ID: {message_id}\r\n\r\nhello\r\n".encode())
    return rcpt, code


def wait_until_queue_empty(server: Server, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while queue_ids(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert queue_ids(server) == [], server.diagnostics()


def test_localAddressesAccepted(env) -> None:
    """Mail for local users and postmaster, in every accepted spelling, is delivered locally, never relayed."""
    server, sink = env
    for name, path in LOCAL_OK:
        c = RawSMTP(server.ports["smtp"])
        try:
            c.cmd(b"EHLO client.test")
            assert c.cmd(b"MAIL FROM:<someone@remote.example>").startswith(b"250")
            got = c.cmd(b"RCPT TO:" + path)
            assert got.startswith(b"250 2.1.5"), (name, got)
            assert c.cmd(b"DATA").startswith(b"354")
            assert c.cmd(b"Subject: " + name.encode() + b"\r\n\r\nbody\r\n.").startswith(b"250 2.0.0"), name
            c.cmd(b"QUIT")
        finally:
            c.close()
    wait_until_queue_empty(server)
    assert sink.snapshot() == []


def test_authenticatedSubmissionRelays(env) -> None:
    """The positive case: an authenticated user on submission (STARTTLS + AUTH) relays to a remote
    address (250 2.1.5), and the message arrives at the smarthost sink."""
    server, sink = env
    rcpt, code = submit_relay(server, "<auth-relay@test>")
    assert rcpt == (250, b"2.1.5 Recipient ok")
    assert code == 250
    deadline = time.monotonic() + 30
    while not sink.snapshot() and time.monotonic() < deadline:
        time.sleep(0.1)
    got = sink.snapshot()
    assert [(s, r) for s, r, _ in got] == [("alice@localhost", ["user@remote.example"])]
    assert b"<auth-relay@test>" in got[0][2]


def test_unauthenticatedSubmissionRefused(env) -> None:
    """Submission without AUTH: MAIL is refused with 530 5.7.0 (after TLS), so nothing can be relayed."""
    server, _ = env
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=20) as c:
        c.starttls(context=ctx)
        c.ehlo()
        code, msg = c.mail("alice@localhost")
        assert (code, msg[:5]) == (530, b"5.7.0")
