# -*- test-case-name: tests.test_dnsresolver -*-
"""The one DNS resolver of the server, shared by every check that asks the DNS.

``[dns] nameservers`` names the servers to ask; when it is empty,
``relay.nameservers``, else the system's ``/etc/resolv.conf``, after
``/etc/hosts`` as the system resolver does (a smarthost named ``localhost``
or a LAN name from the hosts file must keep working).  Answers are
kept for their TTL in twisted.names' ``CacheResolver``: a chain of resolvers
never fills its cache by itself (only ``twisted.names.server`` does), so
``CachingResolver`` asks the upstream on a miss and fills the cache with the
answer.  NXDOMAIN is kept too (RFC 2308 section 5), for the SOA's negative
TTL when the answer carries one and ``NEGATIVE_TTL`` otherwise, at most
``MAX_NEGATIVE_TTL``: an unlisted client of a block list is the common case
and must not cost a round trip per connection.  Other failures (SERVFAIL,
timeouts) are not kept, so a server that recovers is used at once.
Everything stays on the reactor: the lookups are twisted.names Deferreds.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import client, dns, hosts, resolve
from twisted.names.cache import CacheResolver
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError
from zope.interface import implementer

NEGATIVE_TTL = 60.0
MAX_NEGATIVE_TTL = 900.0


@implementer(IResolver)
class CachingResolver(ResolverBase):
    """``upstream`` behind a TTL cache on ``clock``."""

    def __init__(self, upstream: IResolver, clock: IReactorTime) -> None:
        super().__init__()
        self.upstream = upstream
        self.clock = clock
        self.cache = CacheResolver(reactor=clock)
        self.negative: dict[tuple[bytes, int, int], DNSNameError] = {}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred:
        query = dns.Query(name, type, cls)
        return Deferred.fromCoroutine(self._ask(query, timeout))

    async def _ask(self, query: dns.Query, timeout: Any) -> Any:
        key = (query.name.name.lower(), query.type, query.cls)
        if key in self.negative:
            raise self.negative[key]
        try:
            return await self.cache.query(query)
        except dns.DomainError:
            pass  # not cached
        try:
            result = await self.upstream.query(query, timeout)
        except DNSNameError as e:
            self.negative[key] = e
            self.clock.callLater(negative_ttl(e), self.negative.pop, key, None)
            raise
        self.cache.cacheResult(query, result)
        return result


def negative_ttl(error: DNSNameError) -> float:
    """RFC 2308 section 5: the lesser of the SOA's TTL and its MINIMUM field."""
    message = error.args[0] if error.args else None
    if not isinstance(message, dns.Message):  # raised without the answer
        return NEGATIVE_TTL
    for rr in message.authority:
        if isinstance(rr.payload, dns.Record_SOA):
            return float(min(rr.ttl, rr.payload.minimum, MAX_NEGATIVE_TTL))
    return NEGATIVE_TTL


def nameservers(config: Any) -> list[tuple[str, int]]:
    """``dns.nameservers``, else ``relay.nameservers`` (empty: the system's)."""
    return list(config.dns.nameservers or config.relay.nameservers)


def build(config: Any, reactor: Any) -> IResolver:
    """The server's resolver for ``config``."""
    servers = nameservers(config)
    if servers:
        upstream = client.Resolver(servers=servers, reactor=reactor)
        return cast(IResolver, CachingResolver(upstream, reactor))
    upstream = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    chain = [hosts.Resolver(file=b"/etc/hosts"), CachingResolver(upstream, reactor)]
    return cast(IResolver, resolve.ResolverChain(chain))
