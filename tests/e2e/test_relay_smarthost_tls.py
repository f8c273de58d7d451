"""End to end: TLS rules of the smarthost hop.

AUTH (``relay.smarthost_user``) goes only over STARTTLS with a certificate
verified for the smarthost's name (system store plus ``relay.tls_ca_file``);
without credentials a smarthost without STARTTLS still gets the mail in plain
text (opportunistic TLS).  Each case runs its own ``twistd`` with a smarthost
sink (a thread) on loopback.
"""

from __future__ import annotations

import smtplib
import ssl
import time

import pytest

from tests.e2e.harness import Server
from tests.e2e.sinks import Sink, queue_state
from tests.e2e.testca import TestCA, self_signed_context

PASSWORD = "alice-pw"


def _server(root, sink: Sink, extra: str) -> Server:
    (root / "pw").write_text("smarthost-secret\n")
    server = Server(
        root,
        extra_toml=(
            "[relay]\n"
            f'smarthost = "localhost:{sink.port}"\n'
            'retry_intervals = ["1h"]\n'
            'connect_timeout = "3s"\n'
            'command_timeout = "20s"\n'
            'delay_warning_after = ""\n' + extra.replace("PW", str(root / "pw"))
        ),
    )
    r = server.admin("user", "add", "alice@localhost", "--password-stdin", input=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    return server


def _submit(server: Server, marker: str) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    body = f"From: alice@localhost\r\nSubject: {marker}\r\nMessage-ID: <{marker}@localhost>\r\n\r\n{marker}\r\n"
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.starttls(context=ctx)
        c.login("alice@localhost", PASSWORD)
        assert c.sendmail("alice@localhost", ["bob@remote.test"], body.encode()) == {}


def _wait_reply(server: Server, timeout: float = 30.0) -> dict:
    """The queue row once its recipient has a last reply."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = queue_state(server)
        if rows and rows[0]["recipients"][0]["last_reply"]:
            return rows[0]
        time.sleep(0.2)
    raise AssertionError("no delivery attempt recorded\n" + server.diagnostics())


@pytest.fixture
def run(tmp_path):
    started: list = []

    def start(sink: Sink, extra: str = "") -> Server:
        (tmp_path / f"s{len(started)}").mkdir()
        server = _server(tmp_path / f"s{len(started)}", sink, extra)
        started.append((server, sink))
        server.start()
        return server

    yield start
    for server, sink in started:
        sink.stop()
        server.kill()


def test_unverifiedSmarthostNeverGetsAuth(run, tmp_path) -> None:
    """A smarthost presenting a self-signed certificate for CN=evil.invalid never sees
    AUTH nor the mail; the message stays queued with a 4.7.x reason in `queue list`."""
    sink = Sink(tls_context=self_signed_context(str(tmp_path), "evil.invalid"), auth=True)
    server = run(sink, 'smarthost_user = "relay-user"\nsmarthost_password_file = "PW"\n')
    _submit(server, "evil-smarthost")
    row = _wait_reply(server)
    reply = row["recipients"][0]["last_reply"]
    assert reply.split()[1].startswith("4.7."), reply
    assert row["recipients"][0]["status"] != "delivered"
    assert not [c for c in sink.commands if c.upper().startswith("AUTH")]
    assert sink.snapshot() == []


def test_credentialsWithoutTLSStayQueued(run) -> None:
    """With smarthost credentials and a smarthost that offers no STARTTLS: no AUTH in
    plain text, the mail stays queued (4.7.4)."""
    sink = Sink(starttls=False, auth=True)
    server = run(sink, 'smarthost_user = "relay-user"\nsmarthost_password_file = "PW"\n')
    _submit(server, "plain-with-user")
    reply = _wait_reply(server)["recipients"][0]["last_reply"]
    assert reply.split()[1] == "4.7.4", reply
    assert not [c for c in sink.commands if c.upper().startswith("AUTH")]
    assert sink.snapshot() == []


def test_plainSmarthostWithoutCredentialsGetsMail(run) -> None:
    """No credentials and tls_verify false: a smarthost without STARTTLS gets the mail in plain text."""
    sink = Sink(starttls=False)
    server = run(sink)
    _submit(server, "plain-lan-relay")
    got = sink.wait_for(b"plain-lan-relay")
    assert len(got) == 1, server.diagnostics()


def test_verifiedSmarthostGetsAuthAndMail(run, tmp_path) -> None:
    """A smarthost whose certificate is issued for its name by a CA in relay.tls_ca_file
    gets AUTH after STARTTLS, then the mail."""
    ca = TestCA(str(tmp_path))
    sink = Sink(tls_context=ca.server_context("localhost"), auth=True)
    server = run(sink, f'smarthost_user = "relay-user"\nsmarthost_password_file = "PW"\ntls_ca_file = "{ca.ca_file}"\n')
    _submit(server, "verified-smarthost")
    got = sink.wait_for(b"verified-smarthost")
    assert len(got) == 1, server.diagnostics()
    starttls = sink.commands.index("STARTTLS")
    auth = [i for i, c in enumerate(sink.commands) if c.upper().startswith("AUTH")]
    assert auth and auth[0] > starttls
