"""End to end: mail delivered over SMTP is downloaded over POP3 by real clients.

poplib over STLS and over pop3s (byte-exact against the Maildir file), UIDL
stability, deletion only at QUIT, one session per mailbox, and fetchmail.
"""

from __future__ import annotations

import base64
import os
import poplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from tests.e2e.harness import Server

USER = "alice@localhost"
PASSWORD = "correct horse"


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the harness server has a self-signed certificate
    return ctx


def message_files(maildir: str) -> dict[str, str]:
    """unique name -> path, over new/ and cur/."""
    out = {}
    for sub in ("new", "cur"):
        folder = os.path.join(maildir, sub)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                out[name.split(":", 1)[0]] = os.path.join(folder, name)
    return out


def deliver(server: Server, *messages: bytes) -> None:
    """Send messages to alice over the MX listener and wait until they are in her Maildir."""
    before = len(message_files(server.maildir(USER)))
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as smtp:
        for msg in messages:
            smtp.sendmail("sender@example.org", [USER], msg)
    deadline = time.monotonic() + 30
    while len(message_files(server.maildir(USER))) < before + len(messages):
        assert time.monotonic() < deadline, "messages were not delivered\n" + server.diagnostics()
        time.sleep(0.05)


def wire_form(data: bytes) -> bytes:
    """The file with CRLF line endings, as a POP3 client receives it (RFC 1939 section 3)."""
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def stls_session(server: Server, user: str = USER, password: str = PASSWORD) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    pop.stls(tls_context())
    pop.user(user)
    pop.pass_(password)
    return pop


def pop3s_session(server: Server) -> poplib.POP3_SSL:
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=30)
    pop.user(USER)
    pop.pass_(PASSWORD)
    return pop


def uidls(pop: poplib.POP3) -> dict[int, bytes]:
    return {int(n): u for n, u in (line.split() for line in pop.uidl()[1])}


def login_retrying(server: Server) -> poplib.POP3:
    """Log in, waiting while the server still holds the lock of a dropped session."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return stls_session(server)
        except poplib.error_proto as e:
            if b"[IN-USE]" not in e.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def popserver(tmp_path):
    s = Server(tmp_path)
    s.start()
    r = s.admin("user", "add", USER, "--password-stdin", input=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    yield s
    s.kill()


MESSAGES = [
    b"Subject: plain\r\n\r\nHello Alice.\r\n",
    b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n",
    b"Subject: big\r\n\r\n"
    + b"".join(b"line %06d of a big message, dots follow\r\n.%d\r\n" % (i, i) for i in range(12000)),
]


def check_byte_exact(pop: poplib.POP3, maildir: str) -> None:
    files = message_files(maildir)
    listing = {int(n): int(s) for n, s in (line.split() for line in pop.list()[1])}
    ids = uidls(pop)
    assert len(ids) == len(files) == len(MESSAGES)
    for number, uid in ids.items():
        with open(files[uid.decode()], "rb") as f:
            expected = wire_form(f.read())
        resp, lines, octets = pop.retr(number)
        got = b"".join(line + b"\r\n" for line in lines)
        assert got == expected
        assert listing[number] == len(got)  # LIST counts exactly what RETR delivers
        assert resp == b"+OK %d octets" % len(got)


def test_retrOverSTLSByteExact(popserver):
    """poplib over STLS downloads each message byte-exact against its Maildir file."""
    deliver(popserver, *MESSAGES)
    pop = stls_session(popserver)
    check_byte_exact(pop, popserver.maildir(USER))
    assert pop.stat() == (3, sum(int(line.split()[1]) for line in pop.list()[1]))
    pop.quit()
    popserver.stop()


def test_retrOverPop3sByteExact(popserver):
    """poplib over pop3s (implicit TLS) downloads each message byte-exact; TOP works."""
    deliver(popserver, *MESSAGES)
    pop = pop3s_session(popserver)
    assert "STLS" not in pop.capa()
    check_byte_exact(pop, popserver.maildir(USER))
    files = message_files(popserver.maildir(USER))
    dots = [n for n, uid in uidls(pop).items() if b"Subject: dots" in open(files[uid.decode()], "rb").read()][0]
    resp, lines, _ = pop.top(dots, 1)
    assert lines[-2:] == [b"", b".leading dot"]
    pop.quit()


def test_retrOverPlainTCPByteExact(tmp_path):
    """Without TLS (loopback, auth.plaintext_on_loopback) replies go straight to the
    socket: still byte-exact, in order, pipelined or not, big messages included;
    DELE then QUIT removes everything."""
    server = Server(tmp_path, extra_toml="[auth]\nplaintext_on_loopback = true\n")
    server.start()
    try:
        r = server.admin("user", "add", USER, "--password-stdin", input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        deliver(server, *MESSAGES)
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        pop.user(USER)
        pop.pass_(PASSWORD)
        check_byte_exact(pop, server.maildir(USER))
        # Pipelined: several replies to one read, in order.
        pop.sock.sendall(b"NOOP\r\nSTAT\r\nLIST 1\r\n")
        assert [pop._getline()[0] for _ in range(3)][1:] == [b"+OK 3 %d" % pop.stat()[1], pop.list(1)]
        for n in (1, 2, 3):
            pop.dele(n)
        assert pop.quit().startswith(b"+OK")
        assert message_files(server.maildir(USER)) == {}
    finally:
        server.kill()


def test_plaintextLoginRefused(popserver):
    """Without STLS the server refuses USER with -ERR [AUTH] and offers STLS."""
    pop = poplib.POP3("127.0.0.1", popserver.ports["pop3"], timeout=30)
    caps = pop.capa()
    assert "STLS" in caps and "USER" not in caps
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop.user(USER)
    pop.quit()


def test_wrongPasswordAndAuthPlain(popserver):
    """A wrong password gets -ERR [AUTH] (after the throttle's delay); AUTH PLAIN
    with an initial response (RFC 5034) logs in over pop3s."""
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        stls_session(popserver, password="wrong")
    pop = poplib.POP3_SSL("127.0.0.1", popserver.ports["pop3s"], context=tls_context(), timeout=30)
    token = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()).decode()
    assert pop._shortcmd("AUTH PLAIN " + token).startswith(b"+OK")
    assert pop.stat() == (0, 0)
    pop.quit()


def test_uidlStable(popserver):
    """UIDLs stay the same across sessions with a delivery in between and after a :2,S rename."""
    deliver(popserver, MESSAGES[0], MESSAGES[1])
    pop = stls_session(popserver)
    first = uidls(pop)
    pop.quit()
    deliver(popserver, b"Subject: later\r\n\r\nlater\r\n")
    pop = stls_session(popserver)
    second = uidls(pop)
    pop.quit()
    assert {k: second[k] for k in first} == first
    assert len(second) == 3
    cur = os.path.join(popserver.maildir(USER), "cur")
    name = [n for n in os.listdir(cur) if n.startswith(first[1].decode())][0]
    assert name.endswith(":2,")
    os.rename(os.path.join(cur, name), os.path.join(cur, name + "S"))
    pop = stls_session(popserver)
    assert uidls(pop) == second
    pop.quit()


def test_deleAndDropKeeps(popserver):
    """DELE followed by a dropped connection (no QUIT) deletes nothing and moves nothing."""
    deliver(popserver, MESSAGES[0], MESSAGES[1])
    pop = stls_session(popserver)
    pop.dele(1)
    pop.dele(2)
    pop.sock.shutdown(socket.SHUT_RDWR)  # drop the connection without QUIT
    pop.sock.close()
    files = message_files(popserver.maildir(USER)).values()
    assert sorted(os.path.basename(os.path.dirname(f)) for f in files) == ["new", "new"]
    pop = login_retrying(popserver)
    assert pop.stat()[0] == 2
    pop.quit()
    assert len(message_files(popserver.maildir(USER))) == 2


def test_deleAndQuitRemoves(popserver):
    """DELE then QUIT removes the file from the Maildir."""
    deliver(popserver, MESSAGES[0], MESSAGES[1])
    pop = stls_session(popserver)
    keep = uidls(pop)[2]
    pop.dele(1)
    assert pop.quit().startswith(b"+OK")
    files = message_files(popserver.maildir(USER))
    assert list(files) == [keep.decode()]
    # The message kept moved from new/ to cur/ at QUIT, as a Maildir reader does.
    assert files[keep.decode()] == os.path.join(popserver.maildir(USER), "cur", keep.decode() + ":2,")
    pop = stls_session(popserver)
    assert list(uidls(pop).values()) == [keep]
    pop.quit()


def test_secondLoginInUse(popserver):
    """While one session holds the mailbox, a second login gets -ERR [IN-USE]."""
    deliver(popserver, MESSAGES[0])
    first = stls_session(popserver)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop3s_session(popserver)
    first.quit()
    second = pop3s_session(popserver)
    assert second.stat()[0] == 1
    second.quit()


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
@pytest.mark.parametrize("mode", ["stls", "pop3s"])
def test_fetchmailDownloadsAll(popserver, tmp_path, mode):
    """fetchmail fetches every message of the user (and deletes them, its default)."""
    deliver(popserver, *MESSAGES)
    out = tmp_path / "out"
    out.mkdir()
    files = message_files(popserver.maildir(USER))
    expected = sorted(wire_form(open(p, "rb").read()) for p in files.values())
    port = popserver.ports["pop3" if mode == "stls" else "pop3s"]
    tls = 'sslproto "tls1.2+"' if mode == "stls" else "ssl"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f'poll 127.0.0.1 service {port} protocol pop3 auth password timeout 30\n'
        f'  user "{USER}" there with password "{PASSWORD}" is "{os.environ.get("USER", "root")}" here\n'
        f'  options {tls} no sslcertck fetchall\n'
        f'  mda "/bin/sh -c \'cat > {out}/msg.$$\'"\n'
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "-i", str(tmp_path / "ids"), "--nosyslog", "-v", "--nodetach"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    got = sorted(p.read_bytes() for p in out.iterdir())
    assert len(got) == len(MESSAGES)
    # fetchmail's MDA gets LF line endings and fetchmail inserts its own Received:
    # among the trace headers; from the message's own Subject: on all is unchanged.
    for body, want in zip(sorted(got, key=len), sorted(expected, key=len), strict=True):
        want = want.replace(b"\r\n", b"\n")
        assert want[want.index(b"Subject:"):] in body
    assert message_files(popserver.maildir(USER)) == {}


def test_lockHeldByAnotherProcess(popserver):
    """The session lock is a file lock: another process holding it gets the server to answer [IN-USE]."""
    from mailstack.pop3.mailbox import LOCK_NAME
    from mailstack.storage import fsutil

    deliver(popserver, MESSAGES[0])
    with fsutil.locked(os.path.join(popserver.maildir(USER), LOCK_NAME), blocking=False):
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            stls_session(popserver)
    pop = stls_session(popserver)
    assert pop.stat()[0] == 1
    pop.quit()


def test_autologoutAndSTLSInjection(tmp_path):
    """With pop3.idle_timeout = "1s" an idle session is closed with -ERR and its DELE
    is not carried out; a command pipelined in the clear after STLS is discarded."""
    server = Server(tmp_path, extra_toml='[pop3]\nidle_timeout = "1s"\n')
    try:
        server.start()
        assert server.admin("user", "add", USER, "--password-stdin", input=PASSWORD + "\n").returncode == 0
        deliver(server, MESSAGES[0])

        raw = socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10)
        assert raw.recv(100).startswith(b"+OK")
        raw.sendall(b"STLS\r\nUSER injected@localhost\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += raw.recv(1)
        assert reply == b"+OK Begin TLS negotiation\r\n"
        tls = tls_context().wrap_socket(raw)
        tls.sendall(b"PASS anything\r\n")
        assert tls.recv(200).startswith(b"-ERR Send USER first")  # the USER was dropped
        tls.close()

        pop = stls_session(server)
        pop.dele(1)
        # Wait for the event, not for a time: the server ends the idle session.
        pop.sock.settimeout(60)
        said = b""
        try:
            while chunk := pop.sock.recv(4096):
                said += chunk
        except OSError:  # closed without a TLS close_notify
            pass
        assert said.startswith(b"-ERR"), said
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            pop.stat()
        pop = login_retrying(server)
        assert pop.stat()[0] == 1
        pop.quit()
        server.stop()
    finally:
        server.kill()
