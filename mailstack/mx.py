# -*- test-case-name: tests.test_mx -*-
"""Where mail for a domain goes: MX ordering (pure) and DNS lookups (twisted.names).

* ``order_hosts(domain, records, rng)`` is pure: MX records sorted by
  preference, equal preferences shuffled (RFC 5321 section 5.1); a null MX
  (RFC 7505: a single ``0 .``) is a permanent failure 556 5.1.10; no MX
  records means the domain itself is the host (implicit MX, RFC 5321 5.1).
* ``Resolver`` provides ``IMXResolver`` over ``twisted.names``: the servers
  of ``relay.nameservers`` or the system resolver.  NXDOMAIN is permanent
  (550 5.1.2), SERVFAIL and timeouts are temporary (451 4.4.3).  The A and
  AAAA records of the first ``relay.max_mx_hosts`` hosts are looked up in
  parallel within ``ADDRESS_DEADLINE``, so the caller can try each address.

The smarthost (``relay.smarthost``) bypasses MX lookups: ``delivery/remote.py``
connects to it directly, asking ``Resolver.addresses`` for its A/AAAA records
unless it is given as an address.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.cache import CacheResolver
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.config import Config
from mailstack.delivery import replies as OR
from mailstack.errors import PermanentFailure, TemporaryFailure
from mailstack.interfaces import IMetrics, IMXResolver
from mailstack.metrics import NoMetrics

# Per query: retry after 2 s, 5 s, then give up after 10 s more (twisted.names).
DNS_TIMEOUT = (2, 5, 10)
# All MX host address lookups of one domain together (they run in parallel).
ADDRESS_DEADLINE = 20.0


def _cancel_all(lookups: list[Deferred]) -> None:
    """The address lookups still running at the deadline end (as temporary failures)."""
    for d in lookups:
        if not d.called:
            d.cancel()


@dataclass(frozen=True)
class Host:
    """One mail server: its name, its addresses (None: not resolved yet), preference."""

    name: str
    addresses: tuple[str, ...] | None
    preference: int


def _norm(name: Any) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return str(name).rstrip(".").lower()


def order_hosts(
    domain: str,
    records: Sequence[tuple[int, str]],
    rng: random.Random,
    local_names: Iterable[str] = (),
) -> list[Host]:
    """MX ``(preference, exchange)`` records -> hosts to try, in order (pure).

    RFC 5321 5.1: lowest preference first, equal preferences in random order;
    no records -> the domain itself (implicit MX).  RFC 7505: a null MX (one
    record with exchange ``.``) raises PermanentFailure(556 5.1.10); a ``.``
    among real exchanges is ignored.  If one of ``local_names`` (our own
    hostname) is an exchange, only hosts with a lower preference are kept
    (RFC 5321 5.1), and none left is a mail loop (554 5.4.6).
    """
    if not records:
        return [Host(domain, None, 0)]
    cleaned = [(int(p), _norm(n)) for p, n in records]
    real = [(p, n) for p, n in cleaned if n not in ("", ".")]
    if not real:
        raise PermanentFailure(OR.NULL_MX)
    local = {_norm(n) for n in local_names}
    mine = [p for p, n in real if n in local]
    if mine:
        real = [(p, n) for p, n in real if p < min(mine)]
        if not real:
            raise PermanentFailure(OR.MAIL_LOOP)
    by_pref: dict[int, list[str]] = {}
    for p, n in real:
        if n not in by_pref.setdefault(p, []):
            by_pref[p].append(n)
    hosts: list[Host] = []
    seen: set[str] = set()
    for p in sorted(by_pref):
        names = sorted(by_pref[p])
        rng.shuffle(names)
        for n in names:
            if n not in seen:  # a name listed twice is tried at its best preference
                seen.add(n)
                hosts.append(Host(n, None, p))
    return hosts


def literal_address(domain: str) -> str | None:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` -> the IP; None for a name."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def split_hostport(value: str, default_port: int) -> tuple[str, int]:
    """``"host:port"`` / ``"[::1]:port"`` / ``"host"`` -> (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    return host, int(port) if port else default_port


def _is_temporary(failure: Failure) -> bool:
    return not failure.check(DNSNameError)


@implementer(IMXResolver)
class Resolver:
    """IMXResolver over a twisted.names resolver (``IResolver``)."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        resolver: IResolver | None = None,
        rng: random.Random | None = None,
        metrics: IMetrics | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics: IMetrics = metrics if metrics is not None else NoMetrics()
        if resolver is None:
            from twisted.names import client

            servers = list(config.relay.nameservers)
            if servers:
                resolver = client.Resolver(servers=servers, reactor=clock)
            else:
                resolver = client.createResolver()
        self.resolver: IResolver = resolver  # also MTA-STS's (``delivery.remote.build``)
        self.rng = rng if rng is not None else random.Random()
        # Answers are kept for their TTL in twisted.names' own CacheResolver
        # (on our clock), so a burst of mail to one domain costs one set of
        # lookups.  A resolver chain never fills its CacheResolver (only
        # twisted.names.server does), so this one is filled here.  A "no
        # data" answer is kept for the TTL of the SOA that comes with it
        # (RFC 2308 section 5); failures are not kept.
        self._cache = CacheResolver(reactor=clock)

    async def _query(self, name: str, qtype: int) -> list[dns.RRHeader]:
        """The answer records for ``name``/``qtype``, from the cache or the DNS."""
        query = dns.Query(name, qtype)
        try:
            cached = await self._cache.query(query)
            return list(cast(list[dns.RRHeader], cached[0]))
        except dns.DomainError:
            pass  # not cached
        started = self.clock.seconds()
        try:
            result = await self.resolver.query(query, DNS_TIMEOUT)
        finally:
            self.metrics.dns_lookup(self.clock.seconds() - started)
        self._cache.cacheResult(query, result)
        return list(cast(list[dns.RRHeader], result[0]))

    def hosts_for(self, domain: str) -> Deferred:
        """Deferred firing with the ordered ``Host`` list; addresses filled in."""
        return Deferred.fromCoroutine(self._hosts_for(domain))

    async def _hosts_for(self, domain: str) -> list[Host]:
        literal = literal_address(domain)
        if literal is not None:
            return [Host(domain, (literal,), 0)]
        try:
            answers = await self._query(domain, dns.MX)
        except DNSNameError:
            raise PermanentFailure(OR.NO_DOMAIN) from None
        except Exception as e:
            self.log.info("MX lookup for {domain} failed: {error}", domain=domain, error=repr(e))
            raise TemporaryFailure(OR.DNS_TEMPORARY) from None
        records = [
            (payload.preference, _norm(payload.name.name))
            for payload in (cast(dns.Record_MX, rr.payload) for rr in answers if rr.type == dns.MX)
        ]
        implicit = not records
        hosts = order_hosts(domain, records, self.rng, (self.config.hostname,))
        # Only the first relay.max_mx_hosts are tried (Postfix smtp_mx_session_limit),
        # and their addresses are looked up at once, all within ADDRESS_DEADLINE:
        # twenty MX hosts whose name servers never answer cost one deadline while
        # the caller holds an outbound slot, not twenty lookup timeouts in a row.
        hosts = hosts[: max(1, self.config.relay.max_mx_hosts)]
        lookups = [Deferred.fromCoroutine(self._addresses(h.name)) for h in hosts]
        deadline = self.clock.callLater(ADDRESS_DEADLINE, _cancel_all, lookups)
        try:
            results = await DeferredList(lookups, consumeErrors=True)
        finally:
            if deadline.active():
                deadline.cancel()
        resolved: list[Host] = []
        temporary = False
        for host, (ok, value) in zip(hosts, results, strict=False):
            addresses, temp = value if ok else ([], True)
            temporary |= temp
            resolved.append(Host(host.name, tuple(addresses), host.preference))
        if not any(h.addresses for h in resolved):
            if implicit and not temporary:
                # RFC 5321 5.1: the domain exists but has neither MX nor address.
                raise PermanentFailure(OR.NO_MAIL_HOST)
            raise TemporaryFailure(OR.NO_ADDRESS if not temporary else OR.DNS_TEMPORARY)
        return resolved

    def addresses(self, name: str) -> Deferred:
        """Deferred firing with the A then AAAA addresses of ``name`` (the smarthost).

        Errbacks TemporaryFailure when there is none (a smarthost that cannot be
        found is our configuration's or the DNS's problem, never the sender's).
        """

        async def lookup() -> list[str]:
            found, _ = await self._addresses(name)
            if not found:
                raise TemporaryFailure(OR.NO_ADDRESS)
            return found

        return Deferred.fromCoroutine(lookup())

    async def _addresses(self, name: str) -> tuple[list[str], bool]:
        """A then AAAA addresses of ``name``; also whether a lookup failed temporarily."""
        literal = literal_address(name)
        if literal is not None:
            return [literal], False
        try:
            ipaddress.ip_address(name)
            return [name], False
        except ValueError:
            pass
        results = await DeferredList(
            [Deferred.fromCoroutine(self._query(name, dns.A)), Deferred.fromCoroutine(self._query(name, dns.AAAA))],
            consumeErrors=True,
        )
        out: list[str] = []
        temporary = False
        for ok, value in results:
            if not ok:
                temporary |= _is_temporary(cast(Failure, value))
                continue
            for rr in value:
                if rr.type == dns.A:
                    out.append(cast(dns.Record_A, rr.payload).dottedQuad())
                elif rr.type == dns.AAAA:
                    out.append(ipaddress.ip_address(cast(dns.Record_AAAA, rr.payload).address).compressed)
        return list(dict.fromkeys(out)), temporary
