"""End to end: real clients (smtplib, swaks, raw sockets) against the SMTP listeners of a running server."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from tests.e2e.harness import Server

PASSWORDS = {"alice@localhost": "alice-pw", "bob@localhost": "bob-pw"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One server for the module, with users alice and bob and an alias for alice.  Unauthenticated
    clients may pipeline behind DATA here, so the smuggling tests reach the DATA decoder."""
    server = Server(tmp_path_factory.mktemp("smtp"), extra_toml="[smtp]\nforbid_unauth_pipelining = false\n")
    server.add_users(PASSWORDS)
    r = server.admin("alias", "add", "sales@localhost", "alice@localhost")
    assert r.returncode == 0, r.stderr
    server.start()
    yield server
    server.shut_down()


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def messages(server: Server, address: str) -> dict[str, bytes]:
    new = os.path.join(server.maildir(address), "new")
    out = {}
    if os.path.isdir(new):
        for name in os.listdir(new):
            with open(os.path.join(new, name), "rb") as f:
                out[name] = f.read()
    return out


def wait_for(server: Server, address: str, marker: bytes, timeout: float = 20.0) -> list[bytes]:
    """The delivered messages of ``address`` containing ``marker`` (waits for at least one)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in messages(server, address).values() if marker in m]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def strip_added_headers(data: bytes) -> bytes:
    """Remove Return-Path:, Delivered-To:, the (folded) Received: header the server added
    and, on MX mail, its (folded) Authentication-Results: header."""
    m = re.match(
        rb"Return-Path: [^\r\n]*\r\nDelivered-To: [^\r\n]*\r\nReceived: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*"
        rb"(?:Authentication-Results: localhost;[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)?",
        data,
    )
    assert m, data[:300]
    return data[m.end() :]


def test_mxDeliversByteExact(srv):
    """smtplib over MX to a local user: the Maildir file is the sent message plus the added headers,
    byte for byte (8-bit content, lines starting with dots, a 998-byte line)."""
    marker = b"byte-exact-1"
    body = (
        b"From: someone@remote.test\r\nTo: alice@localhost\r\nSubject: " + marker + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"caf\xc3\xa9 \xff\xfe raw 8-bit\r\n"
        b".leading dot\r\n..two dots\r\n.\r\n...\r\n"
        + b"L" * 998 + b"\r\n"
        b"last line\r\n"
    )
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as c:
        c.ehlo("client.test")
        assert c.has_extn("8bitmime") and c.has_extn("pipelining") and c.has_extn("enhancedstatuscodes")
        assert c.has_extn("starttls") and not c.has_extn("auth")
        try:
            c.sendmail("someone@remote.test", ["alice@localhost"], body, mail_options=["BODY=8BITMIME"])
        except smtplib.SMTPException as e:
            raise AssertionError(f"{e!r}\n{srv.diagnostics()}") from None
    found = wait_for(srv, "alice@localhost", marker)
    assert len(found) == 1
    assert strip_added_headers(found[0]) == body
    assert b"Received: from client.test" in found[0]


def test_mxSwaks(srv):
    """swaks delivers over the MX listener."""
    r = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{srv.ports['smtp']}", "--from", "x@remote.test", "--to",
         "bob@localhost", "--header", "Subject: swaks-mx", "--body", "hello from swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(wait_for(srv, "bob@localhost", b"swaks-mx")) == 1


def test_mxConversationChecks(srv):
    """Over the wire: unknown local user 550 5.1.1, relay 550 5.7.1, postmaster accepted, AUTH needs TLS."""
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as c:
        c.ehlo("client.test")
        assert c.mail("x@remote.test")[0] == 250
        code, text = c.rcpt("nobody@localhost")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = c.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (550, b"5.7.1")
        assert c.rcpt("postmaster@localhost")[0] == 250
        assert c.rcpt("<postmaster>")[0] == 250
        c.rset()
        code, text = c.docmd("AUTH", "PLAIN AGFsaWNlQGxvY2FsaG9zdABhbGljZS1wdw==")
        assert (code, text[:5]) == (530, b"5.7.0")


def swaks_has_tls() -> bool:
    return subprocess.run(["perl", "-MNet::SSLeay", "-e", "1"], capture_output=True).returncode == 0


@pytest.mark.skipif(not swaks_has_tls(), reason="swaks needs Net::SSLeay (Debian: libnet-ssleay-perl) for --tls")
def test_submissionStartTLSAuthPlainAndLoginWithSwaks(srv):
    """swaks: submission with STARTTLS + AUTH PLAIN, and with AUTH LOGIN, delivers."""
    for mech in ("PLAIN", "LOGIN"):
        r = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{srv.ports['submission']}", "--tls", "--auth", mech,
             "--auth-user", "alice@localhost", "--auth-password", PASSWORDS["alice@localhost"],
             "--from", "alice@localhost", "--to", "bob@localhost",
             "--header", f"Subject: swaks-sub-{mech}", "--body", "submitted"],
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "alice-pw" not in srv.log()
        assert len(wait_for(srv, "bob@localhost", f"swaks-sub-{mech}".encode())) == 1


def test_submissionStartTLSAuthMechanismsWithSmtplib(srv):
    """smtplib: STARTTLS then AUTH PLAIN, and in another session AUTH LOGIN; both deliver."""
    for mech in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as c:
            c.ehlo("client.test")
            c.starttls(context=tls_context())
            c.ehlo("client.test")
            c.user, c.password = "alice@localhost", PASSWORDS["alice@localhost"]
            authobject = c.auth_plain if mech == "PLAIN" else c.auth_login
            code, text = c.auth(mech, authobject, initial_response_ok=(mech == "PLAIN"))
            assert (code, text[:5]) == (235, b"2.7.0")
            c.sendmail("alice@localhost", ["bob@localhost"], f"Subject: smtplib-{mech}\r\n\r\nhi\r\n")
        assert len(wait_for(srv, "bob@localhost", f"smtplib-{mech}".encode())) == 1


def test_submissionRules(srv):
    """Submission: 530 5.7.0 for AUTH before TLS and MAIL before AUTH, 535 5.7.8 for a bad password,
    553 5.7.1 for a sender not owned, alias sender accepted."""
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as c:
        c.ehlo("client.test")
        code, text = c.docmd("AUTH", "PLAIN AGFsaWNlQGxvY2FsaG9zdABhbGljZS1wdw==")
        assert (code, text[:5]) == (530, b"5.7.0")
        code, text = c.mail("alice@localhost")
        assert (code, text[:5]) == (530, b"5.7.0")
        c.starttls(context=tls_context())
        c.ehlo("client.test")
        assert "PLAIN" in c.esmtp_features["auth"] and "LOGIN" in c.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("alice@localhost", "wrong")
        assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
        c.login("alice@localhost", PASSWORDS["alice@localhost"])
        code, text = c.mail("bob@localhost")
        assert (code, text[:5]) == (553, b"5.7.1")
        code, text = c.mail("<>")
        assert (code, text[:5]) == (553, b"5.7.1")
        assert c.mail("sales@localhost")[0] == 250
        assert c.rcpt("bob@localhost")[0] == 250
        code, _ = c.data(b"Subject: alias-sender\r\n\r\nvia alias\r\n")
        assert code == 250
    found = wait_for(srv, "bob@localhost", b"alias-sender")
    assert len(found) == 1
    # STARTTLS on a plain TCP transport: the TLS version and cipher still reach Received:.
    assert re.search(rb"with ESMTPSA\s+\(TLSv1\.[23] ", found[0]), found[0][:400]


def test_submissionsImplicitTLS(srv):
    """smtplib.SMTP_SSL on the implicit-TLS listener: AUTH, then relay-free local delivery."""
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], context=tls_context(), timeout=30) as c:
        c.ehlo("client.test")
        assert not c.has_extn("starttls")
        c.login("bob@localhost", PASSWORDS["bob@localhost"])
        c.sendmail("bob@localhost", ["alice@localhost"], b"Subject: implicit-tls\r\n\r\nover TLS\r\n")
    found = wait_for(srv, "alice@localhost", b"implicit-tls")
    assert len(found) == 1
    assert re.search(rb"with ESMTPSA\s+\(TLSv1\.[23] ", found[0]), found[0][:400]


def recv_until(sock: socket.socket, pattern: bytes, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not re.search(pattern, data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_startTLSPipelinedCommandNotExecuted(srv):
    """STARTTLS with a command pipelined behind it in the same packet: only the 220 comes back,
    and in TLS the session starts afresh (the MAIL was not executed)."""
    raw = socket.create_connection(("127.0.0.1", srv.ports["submission"]), timeout=20)
    try:
        recv_until(raw, rb"220 [^\r]*\r\n")
        raw.sendall(b"EHLO c\r\n")
        recv_until(raw, rb"250 [^\r]*\r\n")
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<alice@localhost>\r\n")
        reply = recv_until(raw, rb"\r\n")
        assert reply == b"220 2.0.0 Ready to start TLS\r\n"
        tls = tls_context().wrap_socket(raw)
        tls.sendall(b"RCPT TO:<bob@localhost>\r\n")
        # Not 250 and not "nested MAIL": the pipelined MAIL never ran; EHLO is needed again.
        assert recv_until(tls, rb"\r\n")[:9] == b"503 5.5.1"
        tls.sendall(b"QUIT\r\n")
        assert recv_until(tls, rb"\r\n")[:3] == b"221"
    finally:
        raw.close()


def test_smugglingOneMessage(srv):
    """A 100 KB line and fake end-of-data sequences followed by a pipelined transaction, in one write:
    exactly one message per transaction, and sequences with bare CR/LF are refused, never split."""
    marker = b"smuggle-probe"
    probes = [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r\r\n", None]
    with socket.create_connection(("127.0.0.1", srv.ports["smtp"]), timeout=30) as s:
        recv_until(s, rb"220 [^\r]*\r\n")
        s.sendall(b"EHLO c\r\n")
        recv_until(s, rb"250 [^\r]*\r\n")
        for i, seq in enumerate(probes):
            tag = marker + b"-%d" % i
            fake = b"x" * 100_000 if seq is None else b"fake end" + seq
            s.sendall(
                b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n"
                b"Subject: " + tag + b"\r\n\r\n" + fake +
                b"\r\nmail FROM:<admin@localhost>\r\nrcpt TO:<bob@localhost>\r\ndata\r\nSubject: SMUGGLED-"
                + tag + b"\r\n\r\nsmuggled\r\n.\r\n"
            )
            reply = recv_until(s, rb"\n(250 2\.0\.0|5\d\d 5\.\d+\.\d+)[^\r]*\r\n")
            # Reply lines, not substrings: a queue ID in the 250 line may contain "354".
            assert [line[:4] for line in reply.split(b"\r\n")].count(b"354 ") == 1
        s.sendall(b"QUIT\r\n")
        recv_until(s, rb"221")
    time.sleep(1.0)
    alice = list(messages(srv, "alice@localhost").values())
    bob = list(messages(srv, "bob@localhost").values())
    assert not any(b"\r\n\r\nsmuggled" in m and m.startswith(b"Return-Path: <admin") for m in bob)
    for i, seq in enumerate(probes):
        tag = marker + b"-%d" % i
        got = [m for m in alice if b"Subject: " + tag + b"\r\n" in m]
        bare = seq is not None and (b"\r" in seq.replace(b"\r\n", b"") or b"\n" in seq.replace(b"\r\n", b""))
        assert len(got) == (0 if bare else 1), (seq, len(got))
        assert not [m for m in bob if b"SMUGGLED-" + tag in m]
