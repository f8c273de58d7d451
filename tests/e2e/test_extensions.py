"""End to end: SMTPUTF8, CHUNKING, DSN and double bounces against a real ``twistd mailstack``.

Local domain ``example.org`` with users ``josé@example.org`` (a UTF-8 local
part), ``alice@example.org`` and ``postmaster@example.org``; outbound mail goes
to a sink through ``relay.smarthost``.  The sink offers neither SMTPUTF8 nor
DSN, and refuses ``nobody@remote.test``.
"""

from __future__ import annotations

import email
import email.policy
import os
import poplib
import smtplib
import socket
import time

import pytest

from tests.e2e.harness import Server
from tests.e2e.sinks import Sink, maildir_messages

PASSWORD = "pw-of-everyone"
JOSE = "josé@example.org"


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    root = tmp_path_factory.mktemp("ext")
    sink = Sink(reject=("nobody@remote.test",))
    server = Server(
        root,
        extra_toml=(
            '[domains]\nlocal = ["example.org"]\n'
            "[auth]\nplaintext_on_loopback = true\n"
            f'[relay]\nsmarthost = "127.0.0.1:{sink.port}"\nretry_intervals = ["1h"]\ndelay_warning_after = ""\n'
            "[limits]\nmessages_per_hour = 0\n"
        ),
    )
    for user in (JOSE, "alice@example.org", "postmaster@example.org"):
        r = server.admin("user", "add", user, "--password-stdin", input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
    r = server.admin("alias", "add", "fwd@example.org", "nobody@remote.test")
    assert r.returncode == 0, r.stderr
    server.start()
    try:
        yield server, sink
    finally:
        sink.stop()
        try:
            server.stop()
        finally:
            server.kill()


def wait_messages(server: Server, address: str, marker: bytes, n: int = 1, timeout: float = 30.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in maildir_messages(server.maildir(address)) if marker in m]
        if len(found) >= n or time.monotonic() > deadline:
            assert len(found) >= n, f"{marker!r} did not reach {address}\n" + server.diagnostics()
            return found
        time.sleep(0.05)


def wait_queue_empty(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    qdir = os.path.join(server.data_dir, "queue", "env")
    while os.path.isdir(qdir) and os.listdir(qdir):
        assert time.monotonic() < deadline, "queue did not empty\n" + server.diagnostics()
        time.sleep(0.05)


def talk(port: int, data: bytes, replies: int) -> list[bytes]:
    """Send ``data`` pipelined after the banner, as RFC 2920 allows: the commands
    up to DATA in one write, the message only after the 354; the final lines of
    the next ``replies`` replies."""
    head, sep, rest = data.partition(b"DATA\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(head + sep)
        out: list[bytes] = []
        while len(out) < replies:
            line = f.readline()
            assert line, out
            if line[3:4] != b"-":
                out.append(line.rstrip(b"\r\n"))
                if sep and rest and line.startswith(b"354"):
                    s.sendall(rest)
        return out


def submit(
    rcpt: str, marker: str, mail_options: tuple = (), rcpt_options: tuple = (), server: Server | None = None
) -> None:
    """Authenticated submission from alice (AUTH on loopback)."""
    assert server is not None
    body = f"From: alice@example.org\r\nTo: {rcpt}\r\nSubject: {marker}\r\n\r\nbody-of-{marker}\r\n"
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.login("alice@example.org", PASSWORD)
        assert c.sendmail("alice@example.org", [rcpt], body.encode(), list(mail_options), list(rcpt_options)) == {}


def reports(server: Server, marker: bytes, n: int = 1) -> list[email.message.Message]:
    return [
        email.message_from_bytes(m, policy=email.policy.compat32)
        for m in wait_messages(server, "alice@example.org", marker, n)
    ]


def status_groups(msg: email.message.Message) -> list[email.message.Message]:
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            return part.get_payload()
    raise AssertionError("no delivery-status part")


def test_utf8UserOverMXAndPOP3(ext):
    """A UTF-8 message to josé@example.org over the MX (SMTPUTF8) is fetched over POP3 byte-exact."""
    server, _ = ext
    message = "From: jörg@exämple.test\r\nTo: josé@example.org\r\nSubject: grüße utf8-e2e\r\n\r\nÄpfel\r\n".encode()
    out = talk(
        server.ports["smtp"],
        b"EHLO c\r\nMAIL FROM:<j\xc3\xb6rg@ex\xc3\xa4mple.test> SMTPUTF8\r\n"
        + "RCPT TO:<josé@example.org>\r\nDATA\r\n".encode()
        + message
        + b".\r\nQUIT\r\n",
        6,
    )
    assert out[1].startswith(b"250") and out[2].startswith(b"250") and out[4].startswith(b"250 2.0.0"), out
    wait_messages(server, JOSE, b"utf8-e2e")
    assert os.path.basename(server.maildir(JOSE)) == "josé"
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    try:
        assert b"UTF8 USER" in pop._longcmd("CAPA")[1]
        assert pop._shortcmd("UTF8").startswith(b"+OK")
        pop.user(JOSE)
        pop.pass_(PASSWORD)
        lines = pop.retr(1)[1]
    finally:
        pop.quit()
    fetched = b"\r\n".join(lines) + b"\r\n"
    assert fetched.endswith(message), fetched


def test_utf8WithoutSMTPUTF8Refused(ext):
    """Without the SMTPUTF8 parameter a UTF-8 address is refused 553 5.6.7; the session goes on."""
    server, _ = ext
    out = talk(server.ports["smtp"], "EHLO c\r\nMAIL FROM:<jörg@exämple.test>\r\nNOOP\r\nQUIT\r\n".encode(), 4)
    assert out[1].startswith(b"553 5.6.7") and out[2].startswith(b"250"), out


def test_utf8RelayBouncesAtHopWithoutSMTPUTF8(ext):
    """A message that needs SMTPUTF8, relayed to a next hop that does not offer it, bounces with 5.6.7."""
    server, sink = ext
    submit("bob@remote.test", "utf8-relay", mail_options=("SMTPUTF8",), server=server)
    msg = reports(server, b"utf8-relay")[0]
    assert status_groups(msg)[1]["Status"] == "5.6.7"
    assert not sink.wait_for(b"utf8-relay", timeout=0.1)


def test_bdatTwoPipelinedChunks(ext):
    """BDAT in two chunks, pipelined in one write: the Maildir holds exactly those bytes after Received:."""
    server, _ = ext
    one = b"Subject: bdat-e2e\r\n\r\n.a line with a dot\r\n"
    two = b".\r\nlast\r\n"
    out = talk(
        server.ports["smtp"],
        b"EHLO c\r\nMAIL FROM:<x@sender.test>\r\nRCPT TO:<alice@example.org>\r\n"
        + b"BDAT %d\r\n" % len(one)
        + one
        + b"BDAT %d LAST\r\n" % len(two)
        + two
        + b"QUIT\r\n",
        6,
    )
    assert out[3] == b"250 2.0.0 %d octets received" % len(one), out
    assert out[4].startswith(b"250 2.0.0 Ok: queued as"), out
    stored = wait_messages(server, "alice@example.org", b"bdat-e2e")[0]
    assert stored.endswith(one + two)


def test_dsnSuccessLocal(ext):
    """NOTIFY=SUCCESS to a local user: a 'delivered' DSN with ENVID and ORCPT echoed."""
    server, _ = ext
    submit(
        JOSE,
        "dsn-success",
        mail_options=("SMTPUTF8", "ENVID=env+2Bone"),
        rcpt_options=("NOTIFY=SUCCESS", "ORCPT=rfc822;Jose+40example.org"),
        server=server,
    )
    msg = reports(server, b"Original-Envelope-Id: env+one")[0]
    groups = status_groups(msg)
    assert groups[1]["Action"] == "delivered"
    assert groups[1]["Original-Recipient"] == "rfc822; Jose@example.org"


def test_dsnNeverAndRet(ext):
    """NOTIFY=NEVER gets no bounce; RET=HDRS returns headers only, RET=FULL the whole message."""
    server, _ = ext
    submit("nobody@remote.test", "dsn-never", rcpt_options=("NOTIFY=NEVER",), server=server)
    submit("nobody@remote.test", "dsn-hdrs", mail_options=("RET=HDRS",), server=server)
    submit("nobody@remote.test", "dsn-full", mail_options=("RET=FULL",), server=server)
    hdrs = reports(server, b"Subject: dsn-hdrs")[0]
    full = reports(server, b"Subject: dsn-full")[0]
    assert b"body-of-dsn-hdrs" not in hdrs.as_bytes()
    assert b"body-of-dsn-full" in full.as_bytes()
    wait_queue_empty(server)
    assert not [m for m in maildir_messages(server.maildir("alice@example.org")) if b"dsn-never" in m]


def test_dsnRelayed(ext):
    """NOTIFY=SUCCESS relayed to a hop without DSN: the message arrives and alice gets a 'relayed' DSN."""
    server, sink = ext
    submit("carol@remote.test", "dsn-relayed", rcpt_options=("NOTIFY=SUCCESS,FAILURE",), server=server)
    assert sink.wait_for(b"dsn-relayed")
    msg = reports(server, b"Subject: dsn-relayed")[0]
    assert status_groups(msg)[1]["Action"] == "relayed"


def test_doubleBounceOnceToPostmaster(ext):
    """A bounce (MAIL FROM:<>) that cannot be delivered goes once to postmaster, and no further."""
    server, _ = ext
    body = b"Subject: double-bounce-e2e\r\n\r\nx\r\n"
    out = talk(
        server.ports["smtp"],
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<fwd@example.org>\r\nDATA\r\n" + body + b".\r\nQUIT\r\n",
        6,
    )
    assert out[4].startswith(b"250 2.0.0"), out
    got = wait_messages(server, "postmaster@example.org", b"double-bounce-e2e")
    wait_queue_empty(server)
    assert (
        len([m for m in maildir_messages(server.maildir("postmaster@example.org")) if b"double-bounce-e2e" in m]) == 1
    )
    assert b"Status: 5.1.1" in got[0]
