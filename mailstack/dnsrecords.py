# -*- test-case-name: tests.admin.test_dkimcmd -*-
"""The DNS records a local domain should publish so that big providers accept its mail.

``records(config, domain, ips, keys)`` lists them; ``zone_text`` renders them
in zone-file syntax with comments, ``as_json`` as one JSON document.  Nothing
here touches the network: it only tells the operator what to publish.

- MX: the server's hostname (RFC 5321 section 5.1).
- SPF (RFC 7208): ``v=spf1 mx`` plus each ``--ip`` as ``ip4:``/``ip6:``, then
  ``-all``; and ``v=spf1 a -all`` at the hostname, which receivers check for
  bounces (empty MAIL FROM: RFC 7208 section 2.3 uses the HELO name).
- DKIM (RFC 6376 section 3.6.2.1): each active key at ``SEL._domainkey``.
- DMARC (RFC 7489 section 6.3): ``p=quarantine`` with aggregate reports to
  postmaster, a first step before ``p=reject``.
- MTA-STS (RFC 8461): the ``_mta-sts`` TXT record with an ``id`` derived from
  the policy text (so it changes exactly when the policy does), and the policy
  file to serve at ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``; mode
  ``testing`` until TLS-RPT reports show every sender gets through.
- TLS-RPT (RFC 8460 section 3) at ``_smtp._tls``.
- SRV for mail clients: ``_submission._tcp`` (RFC 6186 section 3.1),
  ``_submissions._tcp`` (RFC 8314 section 5.1), ``_pop3s._tcp`` (RFC 6186
  section 3.2), with the ports of the configured listeners; a service without
  a listener gets the "not available" target ``.`` (RFC 6186 section 4).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mailstack.dkim.keys import KeyInfo

MTA_STS_MAX_AGE = 604800  # one week, as RFC 8461 section 3.2 suggests ("weeks or greater")

# The port of a listener endpoint string: "tcp:587", "ssl:465:interface=...", "tcp:port=587".
_PORT = re.compile(r"^[a-z0-9]+:(?:port=)?(\d+)(?::|$)")


@dataclass(frozen=True)
class Record:
    """One resource record; ``value`` is the whole TXT text, unsplit."""

    name: str
    type: str
    value: str
    comment: str = ""


def mta_sts_policy(hostname: str) -> str:
    """The policy file text (RFC 8461 section 3.2), lines ending in LF."""
    return f"version: STSv1\nmode: testing\nmx: {hostname}\nmax_age: {MTA_STS_MAX_AGE}\n"


def mta_sts_url(domain: str) -> str:
    return f"https://mta-sts.{domain}/.well-known/mta-sts.txt"


def _listener_port(endpoints: Sequence[str]) -> int | None:
    for endpoint in endpoints:
        match = _PORT.match(endpoint)
        if match:
            return int(match.group(1))
    return None


def _srv(name: str, hostname: str, endpoints: Sequence[str], what: str) -> Record:
    port = _listener_port(endpoints)
    if port is None:
        return Record(name, "SRV", "0 0 0 .", f"no {what} listener: tells clients the service is not offered")
    return Record(name, "SRV", f"0 1 {port} {hostname}.", what)


def records(config: Any, domain: str, ips: Sequence[str], keys: Sequence[KeyInfo]) -> list[Record]:
    """Every record for ``domain`` (a local domain, A-label); ``ips`` are the
    server's public addresses (validated: ValueError otherwise)."""
    host = config.hostname
    addresses = [ipaddress.ip_address(ip) for ip in ips]
    spf = " ".join(["v=spf1", "mx", *(f"ip{a.version}:{a}" for a in addresses), "-all"])
    policy = mta_sts_policy(host)
    out = [Record(domain, "MX", f"10 {host}.", "mail for the domain goes to this server")]
    out += [
        Record(host, "AAAA" if a.version == 6 else "A", str(a), "the server; its reverse DNS (PTR) must name it too")
        for a in addresses
    ]
    out.append(Record(domain, "TXT", spf, "SPF: only this server sends for the domain"))
    if host != domain:
        out.append(Record(host, "TXT", "v=spf1 a -all", "SPF for the HELO name, checked for bounces"))
    out += [Record(k.name, "TXT", k.record, f"DKIM key {k.selector} ({k.algorithm})") for k in keys]
    out.append(
        Record(
            f"_dmarc.{domain}",
            "TXT",
            f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}",
            "DMARC; once the reports show all your mail passes, change p=quarantine to p=reject",
        )
    )
    out.append(
        Record(
            f"_mta-sts.{domain}",
            "TXT",
            f"v=STSv1; id={hashlib.sha256(policy.encode()).hexdigest()[:16]}",
            f"MTA-STS; serve the policy below at {mta_sts_url(domain)}",
        )
    )
    out.append(Record(f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua=mailto:postmaster@{domain}", "TLS-RPT"))
    listen = config.listen
    out.append(_srv(f"_submission._tcp.{domain}", host, listen.submission, "submission (STARTTLS)"))
    out.append(_srv(f"_submissions._tcp.{domain}", host, listen.submissions, "submission over TLS"))
    out.append(_srv(f"_pop3s._tcp.{domain}", host, listen.pop3s, "POP3 over TLS"))
    return out


def txt_strings(text: str) -> list[str]:
    """``text`` as character-strings of at most 255 bytes (RFC 1035 section 3.3.14)."""
    data = text.encode("ascii")
    return [data[i : i + 255].decode("ascii") for i in range(0, len(data), 255)] or [""]


def zone_line(record: Record) -> str:
    """One zone-file line, the owner name absolute, a long TXT value split."""
    if record.type == "TXT":
        strings = [f'"{s}"' for s in txt_strings(record.value.replace("\\", "\\\\").replace('"', '\\"'))]
        rdata = strings[0] if len(strings) == 1 else f"( {' '.join(strings)} )"
    else:
        rdata = record.value
    return f"{record.name}. IN {record.type} {rdata}"


def zone_text(domain: str, hostname: str, recs: Sequence[Record]) -> str:
    """The records with a comment line each, then the MTA-STS policy and the PTR advice."""
    lines = [f"; DNS records for {domain} (zone-file syntax)"]
    for r in recs:
        if r.comment:
            lines.append(f"; {r.comment}")
        lines.append(zone_line(r))
    lines.append(f"; MTA-STS policy file, served over HTTPS at {mta_sts_url(domain)}")
    lines.append(f"; (mta-sts.{domain} needs an address and a certificate valid for that name):")
    lines += [f";   {line}" for line in mta_sts_policy(hostname).splitlines()]
    lines.append("; after the testing period, set mode: enforce and publish a new _mta-sts id")
    lines.append(f"; PTR: the reverse DNS of each sending address must be {hostname}., resolving back to it")
    return "\n".join(lines) + "\n"


def as_json(domain: str, hostname: str, recs: Sequence[Record]) -> dict[str, Any]:
    return {
        "domain": domain,
        "records": [asdict(r) for r in recs],
        "mta_sts_policy": {"url": mta_sts_url(domain), "text": mta_sts_policy(hostname)},
    }
