# -*- test-case-name: tests.inbound.test_dnsbl -*-
"""DNS block lists: is the client address listed (RFC 5782)?

For client 192.0.2.99 and list ``zen.example`` the A query is
``99.2.0.192.zen.example``; an IPv6 client is written as 32 reversed nibbles
(RFC 5782 section 2.4).  All lists are asked in parallel.

* an answer in 127.0.0.2 - 127.0.0.255 means listed (section 2.1; 127.0.0.1
  and others are not listing codes);
* an answer in 127.255.255.0/24 is the list's error code (Spamhaus answers
  127.255.255.254 to queries through public resolvers, 127.255.255.252 for a
  typo): logged and ignored, never a listing, or every client would be refused;
* NXDOMAIN is not listed; a timeout or server failure is logged and counts as
  not listed: an unreachable list never refuses mail.

``listed(ip)`` fires with the first list, in configured order, that lists
the address, or None.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

from mailstack.inbound.dnsutil import TempDNSError, addresses, lookup, reverse_name
from mailstack.inbound.interfaces import IDNSBLChecker

LISTED = ipaddress.ip_network("127.0.0.0/24")
ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
DNSBL_TIMEOUT = (2, 3)  # seconds per try: a slow list must not hold the session long


@implementer(IDNSBLChecker)
class DNSBLChecker:
    """Queries ``zones`` (e.g. ``["zen.spamhaus.org"]``) on a twisted.names resolver."""

    log = Logger()

    def __init__(self, resolver: IResolver, zones: Sequence[str], timeout: tuple[int, ...] = DNSBL_TIMEOUT) -> None:
        self.resolver = resolver
        self.zones = [z.strip(".").lower() for z in zones if z.strip(".")]
        self.timeout = timeout

    def listed(self, ip: str) -> Deferred[str | None]:
        """Deferred: the first zone listing ``ip``, or None (also for a bad address)."""
        return Deferred.fromCoroutine(self._listed(ip))

    async def _listed(self, ip: str) -> str | None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        name = reverse_name(addr)
        answers = await DeferredList(
            [Deferred.fromCoroutine(self._ask(f"{name}.{zone}", zone)) for zone in self.zones],
        )
        for zone, (ok, hit) in zip(self.zones, answers, strict=False):
            if ok and hit:
                return zone
        return None

    async def _ask(self, query: str, zone: str) -> bool:
        try:
            found = addresses(await lookup(self.resolver, query, dns.A, self.timeout))
        except DNSNameError:
            return False
        except TempDNSError as e:
            self.log.warn("DNSBL {zone} did not answer: {error}", zone=zone, error=str(e))
            return False
        listed = False
        for a in found:
            if a in ERROR_CODES:
                self.log.error(
                    "DNSBL {zone} answered error code {code} (query refused, e.g. through a public resolver); ignored",
                    zone=zone, code=str(a),
                )
            elif a in LISTED and int(a) & 0xFF >= 2:
                listed = True
            else:
                self.log.warn("DNSBL {zone} answered {code}, not a listing code; ignored", zone=zone, code=str(a))
        return listed
