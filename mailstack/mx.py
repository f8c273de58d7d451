# -*- test-case-name: tests.test_mx -*-
"""Where mail for a domain goes: MX ordering (pure) and DNS lookups (twisted.names).

* ``order_hosts(domain, records, rng)`` is pure: MX records sorted by
  preference, equal preferences shuffled (RFC 5321 section 5.1); a null MX
  (RFC 7505: a single ``0 .``) is a permanent failure 556 5.1.10; no MX
  records means the domain itself is the host (implicit MX, RFC 5321 5.1).
* ``Resolver`` provides ``IMXResolver`` over the server's twisted.names
  resolver (``dnsresolver.build``).  NXDOMAIN is permanent
  (550 5.1.2), SERVFAIL and timeouts are temporary (451 4.4.3).  The A and
  AAAA records of the first ``relay.max_mx_hosts`` hosts are looked up in
  parallel within ``ADDRESS_DEADLINE``, so the caller can try each address.
  Answers are cached for their TTL; when all that a domain needs is cached
  (mail streaming to one domain), ``hosts_for`` answers at once, without a
  Deferred per lookup or a deadline timer.

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

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.config import Config
from mailstack.delivery import replies as OR
from mailstack.dnsresolver import CachingResolver
from mailstack.errors import MailError, PermanentFailure, TemporaryFailure
from mailstack.interfaces import IMXResolver

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
    """IMXResolver over the server's caching twisted.names resolver."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        resolver: CachingResolver,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        # The server's resolver (``dnsresolver.build``), also MTA-STS's
        # (``delivery.remote.build``).  Its answers are kept for their TTL (the
        # least TTL of their records, NXDOMAIN for its negative TTL, failures not
        # at all), so a burst of mail to one domain costs one set of lookups, and
        # a fully cached domain is answered at once (``hosts_for``).
        self.resolver = resolver
        self.rng = rng if rng is not None else random.Random()

    def _cached(self, name: str, qtype: int) -> list[dns.RRHeader] | None:
        """The answer records for ``name``/``qtype`` if the cache has them now, else
        None (also for a cached NXDOMAIN, and a name the DNS cannot take: the
        lookup path reports those)."""
        try:
            kept = self.resolver.cached(dns.Name(name).name, qtype)
        except Exception:
            return None
        return None if kept is None or isinstance(kept, DNSNameError) else kept[0]

    async def _query(self, name: str, qtype: int) -> list[dns.RRHeader]:
        """The answer records for ``name``/``qtype``: the resolver answers from its
        cache when it can (a hit fires at once), else asks the DNS."""
        result = await self.resolver.query(dns.Query(name, qtype), DNS_TIMEOUT)
        return list(cast(list[dns.RRHeader], result[0]))

    def hosts_for(self, domain: str) -> Deferred:
        """Deferred firing with the ordered ``Host`` list; addresses filled in.

        When every answer needed is in the cache (a stream of mail to one
        domain), the list is made at once: no Deferred per lookup, no
        deadline timer.  Otherwise the lookups run (``_hosts_for``)."""
        literal = literal_address(domain)
        if literal is not None:
            return succeed([Host(domain, (literal,), 0)])
        answers = self._cached(domain, dns.MX)
        if answers is None:
            return Deferred.fromCoroutine(self._hosts_for(domain))
        try:
            hosts, implicit = self._mx_hosts(domain, answers)
            found = [self._cached_addresses(h.name) for h in hosts]
            if any(f is None for f in found):
                return Deferred.fromCoroutine(self._resolve(hosts, implicit))
            return succeed(_resolved(hosts, [(cast(list[str], f), False) for f in found], implicit))
        except MailError:
            return fail()

    async def _hosts_for(self, domain: str) -> list[Host]:
        try:
            answers = await self._query(domain, dns.MX)
        except DNSNameError:
            raise PermanentFailure(OR.NO_DOMAIN) from None
        except Exception as e:
            self.log.info("MX lookup for {domain} failed: {error}", domain=domain, error=repr(e))
            raise TemporaryFailure(OR.DNS_TEMPORARY) from None
        return await self._resolve(*self._mx_hosts(domain, answers))

    def _mx_hosts(self, domain: str, answers: list[dns.RRHeader]) -> tuple[list[Host], bool]:
        """The hosts to try, in order, from the MX answer; and whether the MX is
        implicit (no MX records).  PermanentFailure for a null MX."""
        records = [
            (payload.preference, _norm(payload.name.name))
            for payload in (cast(dns.Record_MX, rr.payload) for rr in answers if rr.type == dns.MX)
        ]
        hosts = order_hosts(domain, records, self.rng, (self.config.hostname,))
        # Only the first relay.max_mx_hosts are tried (Postfix smtp_mx_session_limit).
        return hosts[: max(1, self.config.relay.max_mx_hosts)], not records

    async def _resolve(self, hosts: list[Host], implicit: bool) -> list[Host]:
        """The hosts' addresses, looked up at once, all within ADDRESS_DEADLINE:
        twenty MX hosts whose name servers never answer cost one deadline while
        the caller holds an outbound slot, not twenty lookup timeouts in a row."""
        lookups = [Deferred.fromCoroutine(self._addresses(h.name)) for h in hosts]
        deadline = self.clock.callLater(ADDRESS_DEADLINE, _cancel_all, lookups)
        try:
            results = await DeferredList(lookups, consumeErrors=True)
        finally:
            if deadline.active():
                deadline.cancel()
        return _resolved(hosts, [value if ok else ([], True) for ok, value in results], implicit)

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

    def _cached_addresses(self, name: str) -> list[str] | None:
        """The A then AAAA addresses of ``name`` from the cache alone, or None
        if one of the two answers is not there."""
        itself = _address_itself(name)
        if itself is not None:
            return itself
        a, aaaa = self._cached(name, dns.A), self._cached(name, dns.AAAA)
        if a is None or aaaa is None:
            return None
        return _address_list(a + aaaa)

    async def _addresses(self, name: str) -> tuple[list[str], bool]:
        """A then AAAA addresses of ``name``; also whether a lookup failed temporarily."""
        itself = _address_itself(name)
        if itself is not None:
            return itself, False
        results = await DeferredList(
            [Deferred.fromCoroutine(self._query(name, dns.A)), Deferred.fromCoroutine(self._query(name, dns.AAAA))],
            consumeErrors=True,
        )
        records: list[dns.RRHeader] = []
        temporary = False
        for ok, value in results:
            if not ok:
                temporary |= _is_temporary(cast(Failure, value))
                continue
            records += value
        return _address_list(records), temporary


def _address_itself(name: str) -> list[str] | None:
    """A host name that is an address literal or an IP address: itself, else None."""
    literal = literal_address(name)
    if literal is not None:
        return [literal]
    if ":" not in name and not name[:1].isdigit():
        return None  # not an IPv6 (has ":") or IPv4 (starts with a digit) address
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return None
    return [name]


def _address_list(records: list[dns.RRHeader]) -> list[str]:
    """The addresses of A and AAAA records, in order, without repeats."""
    out: list[str] = []
    for rr in records:
        if rr.type == dns.A:
            out.append(cast(dns.Record_A, rr.payload).dottedQuad())
        elif rr.type == dns.AAAA:
            out.append(ipaddress.ip_address(cast(dns.Record_AAAA, rr.payload).address).compressed)
    return list(dict.fromkeys(out))


def _resolved(hosts: list[Host], found: list[tuple[list[str], bool]], implicit: bool) -> list[Host]:
    """The hosts with their addresses; ``found``: per host its addresses and whether
    a lookup failed temporarily.  Raises when no host has an address."""
    resolved = [Host(h.name, tuple(addresses), h.preference) for h, (addresses, _) in zip(hosts, found, strict=True)]
    if not any(h.addresses for h in resolved):
        temporary = any(temp for _, temp in found)
        if implicit and not temporary:
            # RFC 5321 5.1: the domain exists but has neither MX nor address.
            raise PermanentFailure(OR.NO_MAIL_HOST)
        raise TemporaryFailure(OR.NO_ADDRESS if not temporary else OR.DNS_TEMPORARY)
    return resolved
