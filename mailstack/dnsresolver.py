# -*- test-case-name: tests.test_dnsresolver -*-
"""The one DNS resolver of the server, shared by every check that asks the DNS.

``[dns] nameservers`` names the servers to ask; when it is empty,
``relay.nameservers``, else the system's ``/etc/resolv.conf``, after
``/etc/hosts`` as the system resolver does (a smarthost named ``localhost``
or a LAN name from the hosts file must keep working).

Answers are kept for the least TTL of their records (``CachingResolver``,
the outermost layer, so every user of the resolver shares one cache; the MX
resolver asks it what it holds without asking the DNS): a chain of
twisted.names resolvers never fills a cache by itself (only
``twisted.names.server`` does).  A hit is answered at once with the stored
answer, the same few names (a sender's SPF, DMARC and DKIM key records) being
asked for every message: three asks per message made twisted.names'
``CacheResolver`` (which copies every record to lower its TTL on each hit)
a fifth of the inbound checks' cost.  NXDOMAIN is kept too (RFC 2308
section 5), for the SOA's negative TTL when the answer carries one and
``NEGATIVE_TTL`` otherwise, at most ``MAX_NEGATIVE_TTL``: an unlisted client
of a block list is the common case and must not cost a round trip per
connection.  An answer without records is not kept (no TTL to keep it for),
nor are other failures (SERVFAIL, timeouts), so a server that recovers is
used at once.  At most ``MAX_ENTRIES`` names are kept (the oldest dropped
first).  Everything stays on the reactor: the lookups are twisted.names
Deferreds.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import client, dns, hosts, resolve
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.interfaces import IMetrics
from mailstack.metrics import NoMetrics

NEGATIVE_TTL = 60.0
MAX_NEGATIVE_TTL = 900.0
MAX_ENTRIES = 10_000

Answer = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


@implementer(IResolver)
class CachingResolver(ResolverBase):
    """``upstream`` behind a TTL cache on ``clock``."""

    def __init__(
        self,
        upstream: IResolver,
        clock: IReactorTime,
        max_entries: int = MAX_ENTRIES,
        metrics: IMetrics | None = None,
    ) -> None:
        super().__init__()
        self.upstream = upstream
        self.clock = clock
        self.max_entries = max_entries
        self.metrics: IMetrics = metrics if metrics is not None else NoMetrics()
        # (name, type, class) -> (expiry time, answer or the NXDOMAIN error)
        self.entries: dict[tuple[bytes, int, int], tuple[float, Answer | DNSNameError]] = {}

    def cached(self, name: bytes, type: int, cls: int = dns.IN) -> Answer | DNSNameError | None:
        """What a lookup would answer from the cache now (the caller's own lists, or
        the NXDOMAIN error), or None if it would ask ``upstream``; asks nothing."""
        return self._kept((name.lower(), type, cls))

    def _kept(self, key: tuple[bytes, int, int]) -> Answer | DNSNameError | None:
        """``cached`` for a key already made (lower-cased name, type, class)."""
        found = self.entries.get(key)
        if found is None:
            return None
        expires, kept = found
        if self.clock.seconds() >= expires:
            del self.entries[key]
            return None
        if isinstance(kept, DNSNameError):
            return kept
        return (list(kept[0]), list(kept[1]), list(kept[2]))

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred:
        key = (name.lower(), type, cls)
        kept = self._kept(key)
        if isinstance(kept, DNSNameError):
            return fail(Failure(kept))
        if kept is not None:
            return succeed(kept)
        started = self.clock.seconds()
        d = cast(Deferred, self.upstream.query(dns.Query(name, type, cls), timeout))
        d.addBoth(self._timed, started)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return d

    def _timed(self, result: Any, started: float) -> Any:
        """``dns_lookup_seconds``: the lookups that went to the DNS (a hit is not one)."""
        self.metrics.dns_lookup(self.clock.seconds() - started)
        return result

    def _answered(self, answer: Answer, key: tuple[bytes, int, int]) -> Answer:
        records = [*answer[0], *answer[1], *answer[2]]
        if records:
            self._keep(key, min(rr.ttl for rr in records), answer)
        return answer

    def _failed(self, failure: Failure, key: tuple[bytes, int, int]) -> Failure:
        error = failure.value
        if isinstance(error, DNSNameError):
            self._keep(key, negative_ttl(error), error)
        return failure

    def _keep(self, key: tuple[bytes, int, int], ttl: float, kept: Answer | DNSNameError) -> None:
        if ttl <= 0:
            return
        self.entries.pop(key, None)
        while len(self.entries) >= self.max_entries:
            del self.entries[next(iter(self.entries))]  # the oldest
        self.entries[key] = (self.clock.seconds() + ttl, kept)


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


def build(
    config: Any, reactor: Any, metrics: IMetrics | None = None, hosts_file: bytes = b"/etc/hosts"
) -> CachingResolver:
    """The server's resolver for ``config``: one cache in front of all it asks.

    The hosts file's answers carry a TTL of 0, so they are never kept: an edit
    of ``hosts_file`` counts at the next lookup, as with the system resolver.
    """
    servers = nameservers(config)
    upstream: IResolver
    if servers:
        upstream = client.Resolver(servers=servers, reactor=reactor)
    else:
        dns_servers = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
        upstream = resolve.ResolverChain([hosts.Resolver(file=hosts_file, ttl=0), dns_servers])
    return CachingResolver(upstream, reactor, metrics=metrics)
