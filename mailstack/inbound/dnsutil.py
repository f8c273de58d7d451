# -*- test-case-name: tests.inbound.test_spf -*-
"""The DNS questions the inbound checks ask, as Deferreds on a twisted.names ``IResolver``.

Each lookup returns the answers of the asked type only (a CNAME chain the
server followed is thus transparent) and raises one of two exceptions:

* ``DNSNameError`` (twisted.names) for NXDOMAIN, which callers read as "no
  such name";
* ``TempDNSError`` for every other failure (SERVFAIL, timeout, refused), which
  callers report as a temporary error (RFC 7208 section 2.6.6, RFC 6376
  section 6.1.2, RFC 7489 section 6.6.3).
"""

from __future__ import annotations

import ipaddress
from typing import cast

from twisted.internet.defer import TimeoutError
from twisted.internet.interfaces import IResolver
from twisted.names import dns
from twisted.names.error import DNSNameError, DomainError, ResolverError

# Per query: retry after 2 s, then 5 s; give up after 10 s more.
DNS_TIMEOUT = (2, 5, 10)


class TempDNSError(Exception):
    """A lookup failed for a reason other than NXDOMAIN (SERVFAIL, timeout...)."""


def valid_name(name: str) -> bool:
    """A name a DNS query can be made of: no empty label, labels of at most 63
    octets, at most 253 octets in all (RFC 1035 section 2.3.4)."""
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        return False
    return all(0 < len(label) <= 63 for label in name.split("."))


async def lookup(resolver: IResolver, name: str, qtype: int, timeout: tuple[int, ...] = DNS_TIMEOUT) -> list:
    """The payloads of the ``qtype`` answers for ``name`` (``[]``: no data)."""
    try:
        # IResolver's annotation says (RRHeader, RRHeader, RRHeader); the value
        # is (answers, authority, additional), three lists of RRHeader.
        answers = cast("list[dns.RRHeader]", (await resolver.query(dns.Query(name, qtype, dns.IN), timeout))[0])
    except DNSNameError:
        raise
    except (DomainError, ResolverError, TimeoutError, OSError) as e:  # SERVFAIL, REFUSED, timeout...
        raise TempDNSError(f"{dns.QUERY_TYPES.get(qtype, qtype)} {name}: {e!r}") from None
    return [rr.payload for rr in answers if rr.type == qtype]


def txt_strings(payloads: list) -> list[bytes]:
    """Each TXT record as one byte string: its character-strings concatenated
    without separator (RFC 7208 section 3.3, RFC 6376 section 3.6.2.2)."""
    return [b"".join(p.data) for p in payloads]


def addresses(payloads: list) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """A or AAAA payloads -> ip addresses."""
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for p in payloads:
        if isinstance(p, dns.Record_A):
            out.append(ipaddress.IPv4Address(p.address))
        else:
            out.append(ipaddress.IPv6Address(p.address))
    return out


def reverse_name(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The dotted reversed form, without the ``in-addr.arpa``/``ip6.arpa`` suffix:
    octets for IPv4, nibbles for IPv6 (RFC 1035 section 3.5, RFC 3596 section 2.5)."""
    return ip.reverse_pointer.rsplit(".", 2)[0]
