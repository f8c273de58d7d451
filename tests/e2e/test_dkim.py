"""End to end: DKIM signing of submitted mail, checked by dkimpy against DNS.

A real ``twistd mailstack`` with local domains ``localhost`` and
``example.org`` relays through a smarthost, an SMTP sink on 127.0.0.1.  The
DKIM records come from ``mailstack dns-records example.org --json`` and are
published in the fake DNS server (``tests/support/dnsserver.py``); dkimpy
looks them up there (dnspython pointed at it).  The tests run in order: the
key changes of one are the starting point of the next.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from email.parser import BytesHeaderParser
from typing import Any

import dkim
import dns.resolver
import pytest

from tests.e2e.harness import Server
from tests.e2e.sinks import Sink
from tests.support.dnsserver import DNSServer

PASSWORD = "alice-pw"
ALICE = "alice@example.org"
DATED = "Date: Mon, 1 Dec 2025 10:00:00 +0000\r\nMessage-ID: <given-{marker}@client.test>\r\n"


class World:
    """The server, the sink, and the DNS server publishing the current DKIM records."""

    def __init__(self, server: Server, sink: Sink, tmp: Any) -> None:
        self.server = server
        self.sink = sink
        self.tmp = tmp
        self.dns: DNSServer | None = None

    def publish(self) -> list[str]:
        """(Re)publish what ``dns-records --json`` lists; returns the DKIM record names."""
        r = self.server.admin("dns-records", "example.org", "--json")
        assert r.returncode == 0, r.stderr
        zone: dict[str, list[Any]] = {}
        for rec in json.loads(r.stdout)["records"]:
            if rec["type"] == "TXT":
                value = rec["value"]
                chunks = [value[i : i + 255] for i in range(0, len(value), 255)]  # RFC 7208 3.3 / 6376 3.6.2.2
                zone.setdefault(rec["name"].rstrip("."), []).append(("TXT", chunks))
        if self.dns is not None:
            self.dns.stop()
        self.dns = DNSServer(zone, self.tmp)
        self.dns.start()
        return sorted(name for name in zone if "._domainkey." in name)

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        assert self.dns is not None
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.dns.port
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    def signatures(self, data: bytes) -> list[tuple[bool, str]]:
        """(verifies, selector) per DKIM-Signature of ``data``, top down."""
        found = BytesHeaderParser().parsebytes(data).get_all("DKIM-Signature") or []
        out = []
        for index, value in enumerate(found):
            tags = dict(t.strip().split("=", 1) for t in "".join(value.split()).split(";") if "=" in t)
            ok = dkim.DKIM(data).verify(idx=index, dnsfunc=self.dnsfunc)
            out.append((bool(ok), tags["s"]))
        return out

    def active_keys(self) -> list[dict]:
        r = self.server.admin("dkim", "list", "--json")
        assert r.returncode == 0, r.stderr
        return [k for k in json.loads(r.stdout) if k["domain"] == "example.org"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dkim")
    sink = Sink()
    (root / "server").mkdir()
    server = Server(
        root / "server",
        extra_toml=(
            '[domains]\nlocal = ["localhost", "example.org"]\n'
            f'[relay]\nsmarthost = "127.0.0.1:{sink.port}"\nretry_intervals = ["1h"]\ndelay_warning_after = ""\n'
            "[limits]\nmessages_per_hour = 0\n"
        ),
    )
    r = server.admin("user", "add", ALICE, "--password-stdin", input=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    r = server.admin("alias", "add", "fwd@example.org", "carol@remote.test")
    assert r.returncode == 0, r.stderr
    server.start()
    w = World(server, sink, root)
    try:
        deadline = time.monotonic() + 30
        while not w.active_keys():  # made in the thread pool at start
            assert time.monotonic() < deadline, server.diagnostics()
            time.sleep(0.1)
        yield w
    finally:
        sink.stop()
        if w.dns is not None:
            w.dns.stop()
        server.shut_down()


def submit(world: World, marker: str, dated: bool = True) -> bytes:
    """STARTTLS + AUTH submission from alice@example.org to bob@remote.test; the message as the sink got it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    head = f"From: Alice <{ALICE}>\r\nTo: bob@remote.test\r\nSubject: {marker}\r\n"
    if dated:
        head += DATED.format(marker=marker)
    body = f"{head}\r\nHello {marker}\r\n.dot line\r\n\r\n"
    with smtplib.SMTP("127.0.0.1", world.server.ports["submission"], timeout=30) as c:
        c.starttls(context=ctx)
        c.login(ALICE, PASSWORD)
        assert c.sendmail(ALICE, ["bob@remote.test"], body.encode()) == {}
    got = world.sink.wait_for(marker.encode())
    assert len(got) == 1, world.server.diagnostics()
    return got[0][2]


def test_firstStartKeyLogged(world):
    """The first start made an RSA key for example.org and logged its TXT record."""
    (key,) = world.active_keys()
    assert key["algorithm"] == "rsa"
    log = world.server.log()
    assert key["name"] in log and key["record"] in log


def test_signedAndVerifies(world):
    """A submitted message verifies with dkimpy against the published record; a changed Subject does not;
    present Date and Message-ID are kept as they were, once each."""
    names = world.publish()
    data = submit(world, "dkim-signed")
    assert world.signatures(data) == [(True, names[0].split(".")[0])]
    assert world.signatures(data.replace(b"Subject: dkim-signed", b"Subject: dkim-changed")) == [
        (False, names[0].split(".")[0])
    ]
    header = BytesHeaderParser().parsebytes(data)
    assert header.get_all("Message-ID") == ["<given-dkim-signed@client.test>"]
    assert header.get_all("Date") == ["Mon, 1 Dec 2025 10:00:00 +0000"]
    assert data.startswith(b"Received: "), data[:200]


def test_missingDateAndMessageIdAdded(world):
    """Without Date and Message-ID the message gets both (ours, signed), and still verifies."""
    data = submit(world, "dkim-hygiene", dated=False)
    header = BytesHeaderParser().parsebytes(data)
    (mid,) = header.get_all("Message-ID")
    assert mid.endswith("@localhost>"), mid
    assert len(header.get_all("Date")) == 1
    assert [ok for ok, _ in world.signatures(data)] == [True]


def test_ed25519KeyAddsSignature(world):
    """After `dkim keygen --algorithm ed25519` (no restart) a second valid signature is added."""
    r = world.server.admin("dkim", "keygen", "example.org", "--selector", "ed1", "--algorithm", "ed25519")
    assert r.returncode == 0, r.stderr
    world.publish()
    data = submit(world, "dkim-ed25519")
    sigs = world.signatures(data)
    assert len(sigs) == 2 and all(ok for ok, _ in sigs), sigs
    assert "ed1" in {s for _, s in sigs}
    assert b"a=ed25519-sha256" in data


def test_rotation(world):
    """Keygen of a new RSA selector, then retire the old ones: only the new selector signs."""
    old = [k["selector"] for k in world.active_keys()]
    r = world.server.admin("dkim", "keygen", "example.org", "--selector", "rot2")
    assert r.returncode == 0, r.stderr
    for selector in old:
        r = world.server.admin("dkim", "retire", "example.org", selector)
        assert r.returncode == 0, r.stderr
    assert world.publish() == ["rot2._domainkey.example.org"]
    data = submit(world, "dkim-rotated")
    assert world.signatures(data) == [(True, "rot2")]


def test_mxForwardNotSigned(world):
    """MX mail (no AUTH) to an alias forwarding to a remote address arrives unsigned by us,
    even with a From of our own domain."""
    message = (
        "From: someone@example.org\r\nTo: fwd@example.org\r\nSubject: dkim-mx-forward\r\n\r\nforwarded\r\n"
    )
    with smtplib.SMTP("127.0.0.1", world.server.ports["smtp"], timeout=30) as c:
        assert c.sendmail("sender@elsewhere.test", ["fwd@example.org"], message.encode()) == {}
    got = world.sink.wait_for(b"dkim-mx-forward")
    assert len(got) == 1, world.server.diagnostics()
    assert got[0][1] == ["carol@remote.test"]
    assert b"DKIM-Signature" not in got[0][2]
    assert b"Message-ID" not in got[0][2]
