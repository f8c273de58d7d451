"""End to end: the [inbound] checks in a running server, DNS answered by a fake
server (tests/support/dnsserver.py) and clients connecting from chosen 127.x
source addresses."""

from __future__ import annotations

import base64
import re
import smtplib
import time

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.e2e import rspamd as rspamd_proc
from tests.e2e.harness import Server, free_ports
from tests.e2e.test_operations import scrape
from tests.e2e.test_smtp import messages, wait_for
from tests.support.dnsserver import DNSServer

CLIENT = "127.0.0.5"  # the MX client's address, allowed by the SPF records below
OTHER = "127.0.0.9"

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_PEM = _KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
_PUB = base64.b64encode(
    _KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
).decode()
DKIM_TXT = [f"v=DKIM1; k=rsa; p={_PUB}"[i : i + 200] for i in range(0, len(f"v=DKIM1; k=rsa; p={_PUB}"), 200)]

ZONE = {
    # SPF pass through include:
    "include.test": [("TXT", "v=spf1 include:_spf.include.test -all")],
    "_spf.include.test": [("TXT", f"v=spf1 ip4:{CLIENT} -all")],
    # SPF fail through redirect=
    "redirect.test": [("TXT", "v=spf1 redirect=_spf.redirect.test")],
    "_spf.redirect.test": [("TXT", f"v=spf1 ip4:{OTHER} -all")],
    # SPF pass through mx
    "mx.test": [("TXT", "v=spf1 mx -all"), ("MX", (10, "mail.mx.test"))],
    "mail.mx.test": [("A", CLIENT)],
    # SPF fail through a
    "a.test": [("TXT", "v=spf1 a -all"), ("A", OTHER)],
    # no SPF record
    "none.test": [("A", OTHER)],
    # permerror: include of a domain without a record
    "perm.test": [("TXT", "v=spf1 include:nowhere.test -all")],
    # DMARC reject and quarantine for mail that fails SPF
    "reject.test": [("TXT", f"v=spf1 ip4:{OTHER} -all")],
    "_dmarc.reject.test": [("TXT", "v=DMARC1; p=reject")],
    "quarantine.test": [("TXT", f"v=spf1 ip4:{OTHER} -all")],
    "_dmarc.quarantine.test": [("TXT", "v=DMARC1; p=quarantine")],
    # p=reject, SPF fails, an aligned DKIM signature rescues the message
    "signed.test": [("TXT", f"v=spf1 ip4:{OTHER} -all")],
    "_dmarc.signed.test": [("TXT", "v=DMARC1; p=reject")],
    "sel._domainkey.signed.test": [("TXT", DKIM_TXT)],
    # DNSBL: 127.0.0.6 listed, 127.0.0.7 answers the error code
    "6.0.0.127.bl.test": [("A", "127.0.0.2")],
    "7.0.0.127.bl.test": [("A", "127.255.255.254")],
}


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    """The fake DNS server of ZONE, for every server of this module."""
    server = DNSServer(ZONE, tmp_path_factory.mktemp("dns"))
    server.start()
    yield server
    server.stop()


def start(root, dns: DNSServer, inbound: str = "", extra: str = "") -> Server:
    """A server asking ``dns``, with [inbound] ``inbound``, and user alice@localhost."""
    toml = f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n[inbound]\n{inbound}\n{extra}'
    server = Server(root, toml)
    r = server.admin("user", "add", "alice@localhost", "--password-stdin", input="alice-pw\n")
    assert r.returncode == 0, r.stderr
    server.start()
    return server


@pytest.fixture(scope="module")
def mx(tmp_path_factory, dns):
    """A server with the default [inbound] keys (SPF, DKIM, DMARC on), and metrics."""
    (metrics_port,) = free_ports(1)
    server = start(
        tmp_path_factory.mktemp("mx"), dns, extra=f'[listen]\nmetrics = ["tcp:{metrics_port}:interface=127.0.0.1"]\n'
    )
    server.metrics_port = metrics_port
    yield server
    try:
        server.stop()
    finally:
        server.kill()


def message(sender: str, marker: str, extra: str = "") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <alice@localhost>\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@test>\r\n{extra}\r\nbody {marker}\r\n"
    ).encode()


def send(server: Server, sender: str, data: bytes, source: str = CLIENT, helo: str = "client.test") -> None:
    with smtplib.SMTP(
        "127.0.0.1", server.ports["smtp"], local_hostname=helo, timeout=60, source_address=(source, 0)
    ) as c:
        c.sendmail(sender, ["alice@localhost"], data)


def delivered(server: Server, marker: str) -> bytes:
    found = wait_for(server, "alice@localhost", marker.encode())
    assert len(found) == 1, server.diagnostics()
    return found[0]


def auth_results(data: bytes) -> list[str]:
    """The unfolded Authentication-Results fields of a delivered message."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return [
        re.sub(r"\r\n[ \t]+", " ", f)
        for f in re.findall(r"^Authentication-Results:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", head, re.MULTILINE)
    ]


@pytest.mark.parametrize(
    "domain, expected",
    [
        ("include.test", "spf=pass smtp.mailfrom=bob@include.test"),
        ("redirect.test", "spf=fail"),
        ("mx.test", "spf=pass smtp.mailfrom=bob@mx.test"),
        ("a.test", "spf=fail"),
        ("none.test", "spf=none smtp.mailfrom=bob@none.test"),
        ("perm.test", "spf=permerror"),
    ],
)
def test_spfResultInAuthenticationResults(mx, domain, expected):
    """SPF through include, redirect, mx and a (pass, fail, none, permerror) is
    reported in the one Authentication-Results field of our hostname; SPF alone refuses nothing."""
    marker = f"spf-{domain}"
    send(mx, f"bob@{domain}", message(f"bob@{domain}", marker))
    fields = auth_results(delivered(mx, marker))
    assert len(fields) == 1, fields
    assert fields[0].startswith("Authentication-Results: localhost;"), fields
    assert expected in fields[0], fields
    assert "dkim=none" in fields[0] and f"header.from={domain}" in fields[0], fields


def test_dnsQuestionsTimedInMetrics(mx):
    """The checks' questions to the DNS server are counted in dns_lookup_seconds
    (a name asked for the first time cannot come from the cache)."""
    count = ("mailstack_dns_lookup_seconds_count", ())
    before = scrape(mx.metrics_port).get(count, 0.0)
    send(mx, "bob@metrics.none.test", message("bob@metrics.none.test", "dns-metrics"))
    delivered(mx, "dns-metrics")
    assert scrape(mx.metrics_port)[count] > before


def test_dmarcRejectRefusesAndStoresNothing(mx):
    """A From domain with p=reject and a failing SPF gets 550 5.7.1; nothing is delivered;
    the refusal is logged in the documented format."""
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(mx, "bob@reject.test", message("bob@reject.test", "dmarc-reject"))
    assert e.value.smtp_code == 550 and e.value.smtp_error.startswith(b"5.7.1"), e.value
    time.sleep(0.5)  # a wrongly accepted message would have been delivered by now
    assert not [m for m in messages(mx, "alice@localhost").values() if b"dmarc-reject" in m]
    mx.wait_for_log(r'inbound refused peer=127\.0\.0\.5 check=dmarc reason="p=reject of reject\.test')


def test_dmarcQuarantineTagsAsSpam(mx):
    """p=quarantine failing: delivered with X-Spam: yes and dmarc=fail reported."""
    send(mx, "bob@quarantine.test", message("bob@quarantine.test", "dmarc-quarantine"))
    data = delivered(mx, "dmarc-quarantine")
    assert b"\r\nX-Spam: yes\r\n" in data
    assert "dmarc=fail" in auth_results(data)[0]


def test_alignedDkimRescuesSpfFail(mx):
    """An aligned, valid DKIM signature makes DMARC pass under p=reject although SPF fails."""
    raw = message("bob@signed.test", "dkim-rescue")
    signed = dkim.sign(raw, b"sel", b"signed.test", KEY_PEM, include_headers=[b"from", b"to", b"subject"]) + raw
    send(mx, "bob@signed.test", signed)
    field = auth_results(delivered(mx, "dkim-rescue"))[0]
    assert "spf=fail" in field and "dkim=pass header.d=signed.test header.s=sel" in field, field
    assert "dmarc=pass header.from=signed.test" in field, field


def test_forgedAuthenticationResultsRemoved(mx):
    """An incoming Authentication-Results claiming our hostname is removed; one of another host stays."""
    forged = "Authentication-Results: localhost; spf=pass smtp.mailfrom=forged\r\n"
    other = "Authentication-Results: elsewhere.test; spf=pass\r\n"
    send(mx, "bob@include.test", message("bob@include.test", "forged-ar", forged + other))
    data = delivered(mx, "forged-ar")
    fields = auth_results(data)
    assert b"forged" not in data.replace(b"forged-ar", b"")
    assert len(fields) == 2 and fields[0].startswith("Authentication-Results: localhost;"), fields
    assert fields[1] == other.strip(), fields


def test_authenticatedSubmissionExempt(mx):
    """An authenticated session gets none of the checks: no Authentication-Results, no DMARC refusal."""
    with smtplib.SMTP("127.0.0.1", mx.ports["submission"], timeout=60, source_address=(CLIENT, 0)) as c:
        c.starttls()
        c.login("alice@localhost", "alice-pw")
        c.sendmail("alice@localhost", ["alice@localhost"], message("bob@reject.test", "submission-exempt"))
    data = delivered(mx, "submission-exempt")
    assert auth_results(data) == [] and b"X-Spam" not in data


def test_dnsbl(tmp_path, dns):
    """A listed client gets 554 5.7.1 naming the list; 127.255.255.254 (an error code) is ignored
    and logged; an unlisted client is served."""
    server = start(tmp_path, dns, 'dnsbl = ["bl.test"]')
    try:
        with pytest.raises(smtplib.SMTPConnectError) as e:
            smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30, source_address=("127.0.0.6", 0))
        assert e.value.smtp_code == 554 and b"5.7.1" in e.value.smtp_error and b"bl.test" in e.value.smtp_error
        send(server, "bob@include.test", message("bob@include.test", "dnsbl-error-code"), source="127.0.0.7")
        delivered(server, "dnsbl-error-code")
        send(server, "bob@include.test", message("bob@include.test", "dnsbl-unlisted"))
        delivered(server, "dnsbl-unlisted")
        server.wait_for_log(r'inbound refused peer=127\.0\.0\.6 check=dnsbl reason="listed in bl\.test"')
        server.wait_for_log(r"127\.255\.255\.254")
    finally:
        server.stop()


def test_greylisting(tmp_path, dns):
    """The first try gets 451 4.7.1 at RCPT; a retry after the delay is accepted; the triplet
    survives a restart."""
    server = start(tmp_path, dns, 'greylist = "2s"')
    try:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            send(server, "bob@include.test", message("bob@include.test", "grey-1"))
        code, text = e.value.recipients["alice@localhost"]
        assert code == 451 and text.startswith(b"4.7.1")
        time.sleep(2.5)  # the greylisting delay
        send(server, "bob@include.test", message("bob@include.test", "grey-2"))
        delivered(server, "grey-2")
        server.stop()
        server.start()
        send(server, "bob@include.test", message("bob@include.test", "grey-3"))
        delivered(server, "grey-3")
        server.wait_for_log("check=greylist")
    finally:
        server.stop()


@pytest.fixture
def rspamd(tmp_path, dns):
    if not rspamd_proc.available():
        pytest.skip("rspamd is not installed (Debian package rspamd)")
    proc = rspamd_proc.Rspamd(tmp_path / "rspamd", f"127.0.0.1:{dns.port}")
    proc.start()
    yield proc
    proc.stop()


def test_rspamd(tmp_path, dns, rspamd):
    """GTUBE is refused 550 5.7.1; plain mail is delivered."""
    (tmp_path / "mx").mkdir()
    server = start(tmp_path / "mx", dns, f'rspamd = "{rspamd.url}"')
    try:
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(
                server,
                "bob@include.test",
                message("bob@include.test", "gtube", "") + rspamd_proc.GTUBE.encode() + b"\r\n",
            )
        assert e.value.smtp_code == 550 and e.value.smtp_error.startswith(b"5.7.1")
        send(server, "bob@include.test", message("bob@include.test", "rspamd-plain"))
        delivered(server, "rspamd-plain")
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["tempfail", "accept"])
def test_rspamdDown(tmp_path, dns, mode):
    """rspamd unreachable: 451 4.7.1 with "tempfail", delivered with "accept"."""
    (port,) = free_ports(1)
    server = start(tmp_path, dns, f'rspamd = "http://127.0.0.1:{port}"\nrspamd_failure = "{mode}"')
    try:
        data = message("bob@include.test", f"rspamd-down-{mode}")
        if mode == "tempfail":
            with pytest.raises(smtplib.SMTPDataError) as e:
                send(server, "bob@include.test", data)
            assert e.value.smtp_code == 451 and e.value.smtp_error.startswith(b"4.7.1")
        else:
            send(server, "bob@include.test", data)
            delivered(server, f"rspamd-down-{mode}")
    finally:
        server.stop()
