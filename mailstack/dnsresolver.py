# -*- test-case-name: tests.test_dnsresolver -*-
"""The one DNS resolver of the server, shared by every check that asks the DNS.

``[dns] nameservers`` names the servers to ask; when it is empty,
``relay.nameservers``, else the system's ``/etc/resolv.conf``.  Answers are
kept for their TTL in twisted.names' ``CacheResolver``: a chain of resolvers
never fills its cache by itself (only ``twisted.names.server`` does), so
``CachingResolver`` asks the upstream on a miss and fills the cache with the
answer.  Failures (NXDOMAIN, SERVFAIL, timeouts) are not kept, so a list or a
domain that recovers is seen at once.  Everything stays on the reactor: the
lookups are twisted.names Deferreds.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import client, dns
from twisted.names.cache import CacheResolver
from twisted.names.common import ResolverBase
from zope.interface import implementer


@implementer(IResolver)
class CachingResolver(ResolverBase):
    """``upstream`` behind a TTL cache on ``clock``."""

    def __init__(self, upstream: IResolver, clock: IReactorTime) -> None:
        super().__init__()
        self.upstream = upstream
        self.cache = CacheResolver(reactor=clock)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred:
        query = dns.Query(name, type, cls)
        return Deferred.fromCoroutine(self._ask(query, timeout))

    async def _ask(self, query: dns.Query, timeout: Any) -> Any:
        try:
            return await self.cache.query(query)
        except dns.DomainError:
            pass  # not cached
        result = await self.upstream.query(query, timeout)
        self.cache.cacheResult(query, result)
        return result


def nameservers(config: Any) -> list[tuple[str, int]]:
    """``dns.nameservers``, else ``relay.nameservers`` (empty: the system's)."""
    return list(config.dns.nameservers or config.relay.nameservers)


def build(config: Any, reactor: Any) -> IResolver:
    """The server's resolver for ``config``."""
    servers = nameservers(config)
    if servers:
        upstream = client.Resolver(servers=servers, reactor=reactor)
    else:
        upstream = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    return cast(IResolver, CachingResolver(upstream, reactor))
