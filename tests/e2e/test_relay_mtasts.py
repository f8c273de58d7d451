"""End to end: MTA-STS (RFC 8461) in the relay.

A fake DNS (``tests/support/dnsserver.py``, a subprocess) serves four
recipient domains, each with an ``_mta-sts`` TXT record, an MX host and an
address for ``mta-sts.<domain>``; an HTTPS policy server (a thread, port 443
on a loopback address of its own) answers each domain's policy with a
certificate from a throwaway CA that ``relay.tls_ca_file`` names; each MX is an
SMTP sink with STARTTLS on its own loopback address (one ``relay.port``).

* enforce, MX matches, certificate valid for the MX name: delivered over TLS;
* enforce, MX not in the policy: stays queued, 4.7.5 in ``queue list``;
* enforce, certificate for another name: stays queued, nothing delivered;
* testing, MX not in the policy: delivered (the mismatch is only logged).
"""

from __future__ import annotations

import http.server
import random
import smtplib
import ssl
import threading
import time

import pytest

from tests.e2e.harness import Server
from tests.e2e.sinks import Sink, queue_state
from tests.e2e.test_relay import _free_port_on
from tests.e2e.testca import TestCA
from tests.support.dnsserver import DNSServer

PASSWORD = "alice-pw"
NET = f"127.{random.randint(90, 250)}.{random.randint(1, 250)}"
POLICY_IP = f"{NET}.10"
CASES = {
    # domain: (mode, policy mx, MX sink ip, name on the sink's certificate)
    "enforce-ok.test": ("enforce", "mx.enforce-ok.test", f"{NET}.2", "mx.enforce-ok.test"),
    "enforce-nomx.test": ("enforce", "mx.elsewhere.test", f"{NET}.3", "mx.enforce-nomx.test"),
    "enforce-badcert.test": ("enforce", "mx.enforce-badcert.test", f"{NET}.4", "wrong-name.test"),
    "testing.test": ("testing", "mx.elsewhere.test", f"{NET}.5", "mx.testing.test"),
}


class _PolicyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        domain = (self.headers.get("Host") or "").split(":")[0].removeprefix("mta-sts.")
        case = CASES.get(domain)
        if case is None or self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        body = f"version: STSv1\nmode: {case[0]}\nmx: {case[1]}\nmax_age: 86400\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtasts")
    ca = TestCA(str(root))
    policy_ctx = ca.server_context(*[f"mta-sts.{d}" for d in CASES])
    httpd = http.server.ThreadingHTTPServer((POLICY_IP, 443), _PolicyHandler)
    httpd.socket = policy_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    zone: dict = {}
    for domain, (_, _, ip, _) in CASES.items():
        zone[domain] = [("MX", (10, f"mx.{domain}"))]
        zone[f"mx.{domain}"] = [("A", ip)]
        zone[f"_mta-sts.{domain}"] = [("TXT", "v=STSv1; id=20261204")]
        zone[f"mta-sts.{domain}"] = [("A", POLICY_IP)]
    dns = DNSServer(zone, root)
    dns.start()
    port = _free_port_on(*[c[2] for c in CASES.values()])
    sinks = {d: Sink(ip=c[2], port=port, tls_context=ca.server_context(c[3])) for d, c in CASES.items()}
    (root / "server").mkdir()
    server = Server(
        root / "server",
        extra_toml=(
            "[relay]\n"
            f"port = {port}\n"
            f'nameservers = ["127.0.0.1:{dns.port}"]\n'
            f'tls_ca_file = "{ca.ca_file}"\n'
            'retry_intervals = ["1h"]\n'
            'connect_timeout = "3s"\n'
            'command_timeout = "20s"\n'
            'delay_warning_after = ""\n'
        ),
    )
    r = server.admin("user", "add", "alice@localhost", "--password-stdin", input=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    server.start()
    try:
        yield server, sinks
    finally:
        server.kill()
        for s in sinks.values():
            s.stop()
        dns.stop()
        httpd.shutdown()
        httpd.server_close()


def _submit(server: Server, rcpt: str, marker: str) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    body = f"From: alice@localhost\r\nSubject: {marker}\r\nMessage-ID: <{marker}@localhost>\r\n\r\n{marker}\r\n"
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.starttls(context=ctx)
        c.login("alice@localhost", PASSWORD)
        assert c.sendmail("alice@localhost", [rcpt], body.encode()) == {}


def _reply_for(server: Server, rcpt: str, timeout: float = 40.0) -> str:
    """The last reply recorded for ``rcpt`` in ``queue list`` (waiting for the attempt)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for row in queue_state(server):
            for r in row["recipients"]:
                if r["address"] == rcpt and r["last_reply"]:
                    return r["last_reply"]
        time.sleep(0.2)
    raise AssertionError(f"no attempt recorded for {rcpt}\n" + server.diagnostics())


def test_enforceMatchingMXValidCertificateDelivers(env) -> None:
    """enforce + the MX in the policy + a certificate valid for the MX name: delivered over STARTTLS."""
    server, sinks = env
    _submit(server, "bob@enforce-ok.test", "sts-enforce-ok")
    got = sinks["enforce-ok.test"].wait_for(b"sts-enforce-ok", timeout=40)
    assert len(got) == 1, server.diagnostics()
    assert "STARTTLS" in sinks["enforce-ok.test"].commands


def test_enforceMXNotInPolicyStaysQueued(env) -> None:
    """enforce + an MX the policy does not list: never contacted, deferred with 4.7.5 in `queue list`."""
    server, sinks = env
    _submit(server, "bob@enforce-nomx.test", "sts-enforce-nomx")
    reply = _reply_for(server, "bob@enforce-nomx.test")
    assert reply.split()[:2] == ["451", "4.7.5"], reply
    assert "MTA-STS" in reply
    assert sinks["enforce-nomx.test"].snapshot() == []


def test_enforceWrongCertificateStaysQueued(env) -> None:
    """enforce + a certificate issued for another name: nothing delivered, deferred with 4.7.5."""
    server, sinks = env
    _submit(server, "bob@enforce-badcert.test", "sts-enforce-badcert")
    reply = _reply_for(server, "bob@enforce-badcert.test")
    assert reply.split()[:2] == ["451", "4.7.5"], reply
    assert sinks["enforce-badcert.test"].snapshot() == []
    assert not [c for c in sinks["enforce-badcert.test"].commands if c.upper().startswith("MAIL")]


def test_testingModeMismatchDelivers(env) -> None:
    """testing + an MX the policy does not list: delivered anyway (the mismatch is only logged)."""
    server, sinks = env
    _submit(server, "bob@testing.test", "sts-testing")
    got = sinks["testing.test"].wait_for(b"sts-testing", timeout=40)
    assert len(got) == 1, server.diagnostics()
    server.wait_for_log(r"does not match its MTA-STS policy \(testing\)")
