"""End to end: outbound relay through MX and backup MX, queueing, flush and bounces.

A real ``twistd mailstack``; a ``twisted.names`` server (a subprocess) on
127.0.0.1 serving MX records for ``remote.test`` (primary ``mx1`` at
127.0.0.2, backup ``mx2`` at 127.0.0.3); two SMTP sinks (threads) on those
loopback addresses with the same port (``relay.port`` is one port for every
MX host).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from datetime import datetime

import pytest

from tests.e2e.harness import Server
from tests.e2e.sinks import Sink

PASSWORD = "alice-pw"
PRIMARY = "127.0.0.2"
BACKUP = "127.0.0.3"

DNS_SERVER = r"""
import sys
from twisted.internet import reactor
from twisted.names import authority, dns, server
zonefile, port = sys.argv[1], int(sys.argv[2])
factory = server.DNSServerFactory(authorities=[authority.PySourceAuthority(zonefile)])
reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
reactor.listenTCP(port, factory, interface="127.0.0.1")
print("ready", flush=True)
reactor.run()
"""

ZONE = f"""
zone = [
    SOA("remote.test", mname="ns.remote.test", rname="root.remote.test",
        serial=1, refresh=60, retry=60, expire=60, minimum=60),
    MX("remote.test", 10, "mx1.remote.test"),
    MX("remote.test", 20, "mx2.remote.test"),
    A("mx1.remote.test", "{PRIMARY}"),
    A("mx2.remote.test", "{BACKUP}"),
]
"""


def _free_port_on(*ips: str) -> int:
    for _ in range(50):
        s = socket.socket()
        s.bind((ips[0], 0))
        port = s.getsockname()[1]
        others = []
        try:
            for ip in ips[1:]:
                o = socket.socket()
                o.bind((ip, port))
                others.append(o)
        except OSError:
            continue
        finally:
            s.close()
            for o in others:
                o.close()
        return port
    raise RuntimeError("no common free port")


def _free_udp_port() -> int:
    while True:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        u.close()
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """DNS server, two sinks and a mailstack server with user alice@localhost."""
    root = tmp_path_factory.mktemp("relay")
    zonefile = root / "remote.test.zone"
    zonefile.write_text(ZONE)
    dns_port = _free_udp_port()
    dns_proc = subprocess.Popen(
        [sys.executable, "-c", DNS_SERVER, str(zonefile), str(dns_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        line = dns_proc.stdout.readline()
        assert line.strip() == b"ready", line + dns_proc.stdout.read()
        port = _free_port_on(PRIMARY, BACKUP)
        sinks = {
            "primary": Sink(ip=PRIMARY, port=port, reject=("nobody@remote.test",), starttls=False, start=False),
            "backup": Sink(ip=BACKUP, port=port, reject=("nobody@remote.test",), starttls=False, start=False),
        }
        (root / "server").mkdir()
        server = Server(
            root / "server",
            extra_toml=(
                "[relay]\n"
                f"port = {port}\n"
                f'nameservers = ["127.0.0.1:{dns_port}"]\n'
                'retry_intervals = ["1h"]\n'
                'connect_timeout = "3s"\n'
                'command_timeout = "30s"\n'
                'delay_warning_after = ""\n'
                "[limits]\n"
                "messages_per_hour = 0\n"
            ),
        )
        r = server.admin("user", "add", "alice@localhost", "--password-stdin", input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        server.start()
        try:
            yield server, sinks
        finally:
            for s in sinks.values():
                s.stop()
            server.shut_down()
    finally:
        dns_proc.kill()
        dns_proc.wait()


def submit(server: Server, rcpts: list[str], marker: str) -> None:
    """Authenticated submission (STARTTLS + AUTH) from alice@localhost."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    body = (
        f"From: alice@localhost\r\nTo: {', '.join(rcpts)}\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@localhost>\r\n\r\nHello {marker}\r\n.dot line\r\n"
    )
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.starttls(context=ctx)
        c.login("alice@localhost", PASSWORD)
        refused = c.sendmail("alice@localhost", rcpts, body.encode())
        assert refused == {}


def queue_list(server: Server) -> list[dict]:
    r = server.admin("queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_primaryGetsMail(relay):
    """Mail from an authenticated user to a remote domain reaches the primary MX."""
    server, sinks = relay
    sinks["primary"].start()
    sinks["backup"].start()
    try:
        submit(server, ["bob@remote.test"], "relay-primary")
        got = sinks["primary"].wait_for(b"relay-primary")
        assert len(got) == 1, server.diagnostics()
        sender, rcpts, data = got[0]
        assert (sender, rcpts) == ("alice@localhost", ["bob@remote.test"])
        assert b"\r\n.dot line\r\n" in data
        assert sinks["backup"].messages == []
    finally:
        sinks["primary"].stop()
        sinks["backup"].stop()


def test_backupWhenPrimaryDown(relay):
    """With the primary stopped the backup MX gets the mail."""
    server, sinks = relay
    sinks["backup"].start()
    try:
        submit(server, ["carol@remote.test"], "relay-backup")
        got = sinks["backup"].wait_for(b"relay-backup")
        assert len(got) == 1, server.diagnostics()
        assert not [m for m in sinks["primary"].messages if b"relay-backup" in m[2]]
    finally:
        sinks["backup"].stop()


def test_queuedThenFlushed(relay):
    """Both MX down: the message waits in the queue (queue list --json); a sink comes
    back and `mailstack queue flush` makes it arrive without waiting for the retry."""
    server, sinks = relay
    submit(server, ["dave@remote.test"], "relay-queued")
    deadline = time.monotonic() + 30
    while True:
        rows = [r for r in queue_list(server) if any(x["address"] == "dave@remote.test" for x in r["recipients"])]
        if rows and rows[0]["attempts"] >= 1 and rows[0]["last_error"]:
            break
        assert time.monotonic() < deadline, (rows, server.diagnostics())
        time.sleep(0.2)
    row = rows[0]
    assert row["sender"] == "alice@localhost"
    assert row["recipients"][0]["status"] == "pending"
    assert row["last_error"].startswith("4"), row
    show = server.admin("queue", "show", row["id"])
    assert show.returncode == 0 and "relay-queued" in show.stdout, show
    # The next retry is an hour away (retry_intervals = ["1h"]): an arrival within
    # seconds of the flush is the flush's doing, with no need to watch for nothing.
    next_attempt = datetime.fromisoformat(row["next_attempt"].replace("Z", "+00:00")).timestamp()
    assert next_attempt > time.time() + 1800, row
    sinks["primary"].start()
    try:
        r = server.admin("queue", "flush")
        assert r.returncode == 0, r.stderr
        got = sinks["primary"].wait_for(b"relay-queued", timeout=20)
        assert len(got) == 1, server.diagnostics()
        assert time.time() < next_attempt
        deadline = time.monotonic() + 10
        while [r for r in queue_list(server) if r["id"] == row["id"]]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        sinks["primary"].stop()


def test_bounceLandsInSendersMaildir(relay):
    """A 5xx for one recipient: the other gets the mail, and alice gets an RFC 3464 DSN
    in her Maildir naming the failed one, from MAILER-DAEMON with Return-Path <>."""
    server, sinks = relay
    sinks["primary"].start()
    try:
        submit(server, ["nobody@remote.test", "erin@remote.test"], "relay-bounce")
        got = sinks["primary"].wait_for(b"relay-bounce")
        assert len(got) == 1 and got[0][1] == ["erin@remote.test"], got
        new = os.path.join(server.maildir("alice@localhost"), "new")
        deadline = time.monotonic() + 20
        dsns = []
        while not dsns:
            assert time.monotonic() < deadline, server.diagnostics()
            time.sleep(0.1)
            if os.path.isdir(new):
                for name in os.listdir(new):
                    with open(os.path.join(new, name), "rb") as f:
                        data = f.read()
                    if b"multipart/report" in data and b"relay-bounce" in data:
                        dsns.append(data)
        assert len(dsns) == 1
        msg = email.message_from_bytes(dsns[0], policy=email.policy.default)
        assert msg["Return-Path"] == "<>"
        assert msg["From"].addresses[0].addr_spec.lower() == "mailer-daemon@localhost"
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "delivery-status"
        parts = msg.get_payload()
        assert [p.get_content_type() for p in parts] == [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers",
        ]
        groups = email.message_from_bytes(parts[1].as_bytes()).get_payload()
        recipients = [g for g in groups if g["Final-Recipient"]]
        assert [g["Final-Recipient"] for g in recipients] == ["rfc822; nobody@remote.test"]
        assert recipients[0]["Action"] == "failed"
        assert recipients[0]["Status"] == "5.1.1"
        assert recipients[0]["Remote-MTA"] == "dns; mx1.remote.test"
        assert "550 5.1.1" in recipients[0]["Diagnostic-Code"]
        assert "relay-bounce" in parts[2].get_payload()
    finally:
        sinks["primary"].stop()


def test_sigkillWithQueuedMail(relay):
    """SIGKILL while 200 messages for remote domains wait (all MX down); restart; a sink
    comes up and `queue flush` runs: every accepted message arrives, none is lost."""
    server, sinks = relay
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    accepted = []
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=60) as c:
        c.starttls(context=ctx)
        c.login("alice@localhost", PASSWORD)
        for i in range(200):
            marker = f"kill-{i:03d}-marker"
            body = f"From: alice@localhost\r\nTo: x{i}@remote.test\r\nSubject: {marker}\r\n\r\n{marker}\r\n"
            assert c.sendmail("alice@localhost", [f"x{i}@remote.test"], body.encode()) == {}
            accepted.append(marker.encode())
    server.kill()
    server.start()
    sinks["backup"].start()
    try:
        r = server.admin("queue", "flush")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 120
        while True:
            with sinks["backup"]._lock:
                seen = {m for m in accepted for msg in sinks["backup"].messages if m in msg[2]}
            if len(seen) == len(accepted):
                break
            assert time.monotonic() < deadline, (len(seen), server.diagnostics())
            time.sleep(0.2)
            if int(time.monotonic()) % 5 == 0:
                server.admin("queue", "flush")  # anything that was mid-attempt at the kill
        deadline = time.monotonic() + 30
        while [r for r in queue_list(server) if r["sender"] == "alice@localhost"]:
            assert time.monotonic() < deadline, queue_list(server)
            time.sleep(0.2)
    finally:
        sinks["backup"].stop()
