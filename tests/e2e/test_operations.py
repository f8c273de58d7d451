"""End to end: what an operator runs the server with: Prometheus metrics, JSON logs,
systemd readiness, sending limits across a restart, queue hold and release."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import tempfile
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import Server, free_ports, wait_until

PASSWORD = "operator-pw"



def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of /metrics, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode("utf-8")
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def queue_count(server: Server) -> int:
    return len(json.loads(server.admin("queue", "list", "--json").stdout))


@pytest.fixture
def notify_socket(monkeypatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named in $NOTIFY_SOCKET for the server."""
    folder = tempfile.mkdtemp(prefix="msn")  # AF_UNIX paths are short
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_metricsJsonLogsAndReadiness(tmp_path, notify_socket):
    """One server with listen.metrics, log.format = "json" and $NOTIFY_SOCKET:
    READY=1 arrives once the SMTP port answers; the counters follow the messages
    sent and refused; the queue gauge equals `queue list`'s count; every log line
    is JSON and the accepted message's line carries its queue_id."""
    metrics_port, dead_port = free_ports(2)
    server = Server(
        tmp_path,
        extra_toml=(
            f'[listen]\nmetrics = ["tcp:{metrics_port}:interface=127.0.0.1"]\n'
            '[log]\nformat = "json"\n'
            "[auth]\nplaintext_on_loopback = true\n"
            # Outbound mail goes to a closed port: deferred, it stays queued.
            f'[relay]\nsmarthost = "127.0.0.1:{dead_port}"\n'
        ),
    )
    assert server.admin("user", "add", "alice@localhost", "--password-stdin", input=PASSWORD + "\n").returncode == 0
    server.start()
    try:
        socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=5).close()
        assert b"READY=1" in notify_socket.recv(4096).split(b"\n")

        queue_ids = []
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as c:
            c.ehlo()
            for i in range(3):
                c.mail("sender@example.net")
                c.rcpt("alice@localhost")
                code, text = c.data(f"Subject: metrics {i}\r\n\r\nbody\r\n".encode())
                assert code == 250
                queue_ids.append(text.decode().rsplit(" ", 1)[1])
            c.mail("sender@example.net")
            assert c.rcpt("nobody@localhost")[0] == 550  # unknown user
            assert c.rcpt("someone@remote.test")[0] == 550  # relay
            c.rset()
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
            c.login("alice@localhost", PASSWORD)
            c.sendmail("alice@localhost", ["friend@remote.test"], b"Subject: out\r\n\r\nbody\r\n")

        wait_until(
            lambda: len(os.listdir(os.path.join(server.maildir("alice@localhost"), "new"))) == 3, what="delivery"
        )
        values = wait_until(
            lambda: (
                (v := scrape(metrics_port)).get(("mailstack_messages_deferred_total", (("agent", "remote"),))) and v
            ),
            what="the deferral",
        )

        def value(name, **labels):
            return values.get((name, tuple(sorted(labels.items()))), 0.0)

        assert value("mailstack_messages_accepted_total", listener="smtp") == 3
        assert value("mailstack_messages_accepted_total", listener="submission") == 1
        assert value("mailstack_messages_delivered_total", agent="local") == 3
        assert value("mailstack_messages_refused_total", reason="unknown_user") == 1
        assert value("mailstack_messages_refused_total", reason="relay") == 1
        assert value("mailstack_delivery_latency_seconds_count", agent="local") == 3
        assert value("mailstack_queue_entries") == queue_count(server) == 1
        assert value("mailstack_queue_oldest_age_seconds") >= 0
        assert value("mailstack_sessions_open", protocol="smtp") >= 0
        server.stop()
        assert notify_socket.recv(4096) == b"STOPPING=1"
    finally:
        server.kill()

    lines = [line for line in server.log().splitlines() if line]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "text"} <= r.keys() for r in records)
    accepted = [r for r in records if r.get("queue_id") == queue_ids[0] and r["text"].startswith("accepted ")]
    assert accepted, records[-20:]
    assert accepted[0]["recipients"] == ["alice@localhost"]


def send_as(server: Server, user: str, subject: str) -> tuple[int, bytes]:
    """MAIL FROM an authenticated ``user``; (code, text) of MAIL or of the end of DATA."""
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.login(user, PASSWORD)
        code, text = c.mail(user)
        if code != 250:
            return code, text
        assert c.rcpt(user)[0] == 250
        return c.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def test_sendingLimitsPerDayOverrideAndRestart(tmp_path):
    """limits.messages_per_day refuses the next MAIL with 451 4.7.1 naming the daily
    limit; `user limit` raises it for one user at once; the counts survive a restart."""
    server = Server(
        tmp_path,
        extra_toml="[auth]\nplaintext_on_loopback = true\n[limits]\nmessages_per_hour = 0\nmessages_per_day = 2\n",
    )
    for user in ("alice@localhost", "bob@localhost"):
        assert server.admin("user", "add", user, "--password-stdin", input=PASSWORD + "\n").returncode == 0
    server.start()
    try:
        for i in range(2):
            assert send_as(server, "alice@localhost", f"m{i}")[0] == 250
        code, text = send_as(server, "alice@localhost", "over")
        assert (code, text.decode()[:5]) == (451, "4.7.1")
        assert "Daily sending limit of 2 messages" in text.decode()
        assert send_as(server, "bob@localhost", "bob's own count")[0] == 250
        server.stop()
        server.start()
        assert send_as(server, "alice@localhost", "after restart")[0] == 451
        usage = {u["address"]: u for u in json.loads(server.admin("user", "list", "--json").stdout)}
        assert (usage["alice@localhost"]["sent_today"], usage["alice@localhost"]["limit_per_day"]) == (2, 2)
        assert server.admin("user", "limit", "alice@localhost", "--per-day", "3").returncode == 0
        assert send_as(server, "alice@localhost", "raised")[0] == 250
        assert send_as(server, "alice@localhost", "over again")[0] == 451
        server.stop()
    finally:
        server.kill()


def test_holdAndReleaseWithFlush(tmp_path):
    """A held entry is listed as held and not tried by `queue flush`; released, the
    running server tries it at once (its attempts go up)."""
    (dead_port,) = free_ports(1)
    server = Server(
        tmp_path,
        extra_toml=f'[auth]\nplaintext_on_loopback = true\n[relay]\nsmarthost = "127.0.0.1:{dead_port}"\n',
    )
    assert server.admin("user", "add", "alice@localhost", "--password-stdin", input=PASSWORD + "\n").returncode == 0
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
            c.login("alice@localhost", PASSWORD)
            c.sendmail("alice@localhost", ["friend@remote.test"], b"Subject: held\r\n\r\nbody\r\n")

        def attempts():
            rows = json.loads(server.admin("queue", "list", "--json").stdout)
            return rows[0]["attempts"] if rows else 0

        wait_until(lambda: attempts() == 1, what="the first attempt")
        (row,) = json.loads(server.admin("queue", "list", "--json").stdout)
        assert server.admin("queue", "hold", row["id"]).returncode == 0
        assert json.loads(server.admin("queue", "list", "--json").stdout)[0]["held"] is True
        assert server.admin("queue", "flush").returncode == 0
        trigger = os.path.join(server.data_dir, "queue", "flush")
        wait_until(lambda: not os.path.exists(trigger), what="the manager to take the flush")
        assert attempts() == 1  # the flush started no attempt for the held entry
        assert server.admin("queue", "release", "--all").stdout == "released 1 entry\n"
        wait_until(lambda: attempts() == 2, what="the attempt after release")
        assert json.loads(server.admin("queue", "list", "--json").stdout)[0]["held"] is False
        server.stop()
    finally:
        server.kill()
