# -*- test-case-name: tests.test_mtasts -*-
"""Outbound MTA-STS (RFC 8461): which MX hosts of a domain may receive its mail, over verified TLS.

``MTASTS.policy(domain)`` returns a Deferred firing with the domain's
``Policy`` or None (no policy, or mode ``none``).  The relay then sends only to
MX hosts for which ``mx_allowed(policy, host)`` is true, over STARTTLS with a
certificate valid for the MX name, when ``policy.mode == "enforce"``; mode
``testing`` only reports.  It never errbacks: a failure to find or fetch a
policy means "no policy" unless a cached one is still valid (section 5.1).

Discovery (section 3.1): the TXT record at ``_mta-sts.<domain>``, looked up
with ``twisted.names``; exactly one record starting ``v=STSv1`` must exist, and
its ``id`` names the policy version.  A cached policy is used while it has not
expired (``max_age``) and the id is unchanged; a new id, or an expired
policy, fetches the policy again.  With no TXT record or a DNS failure, a
valid cached policy still applies (section 5.1: a policy is only replaced by
a newer one or by its expiry).

Fetch (section 3.3): ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with
``twisted.web.client.Agent``, the certificate verified for that name against
the system store plus ``relay.tls_ca_file``; redirects are not followed
(Agent does not), only a 200 with ``text/plain`` counts, the body is cut off
at 64 KB and the whole fetch at ``FETCH_TIMEOUT``.  A failed fetch for a
given id is not retried for ``RETRY_AFTER``, so a queue full of mail for one
domain costs one attempt.

Cache: one JSON file per domain under ``data_dir/mta-sts/``, read and written
through ``run_blocking``, and a copy in memory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IReactorTime, IResolver, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from zope.interface import Interface, implementer

from mailstack.address import AddressError, normalize_domain
from mailstack.storage import fsutil
from mailstack.trust import IOpenSSLTrustRoot, trust_root

MAX_POLICY_SIZE = 65536  # RFC 8461 section 3.3: senders may limit the body to 64 KB
MEMORY_ENTRIES = 10000  # domains kept in memory (and failures remembered) before a reset
MAX_AGE_LIMIT = 31557600  # RFC 8461 section 3.2: max_age is at most one year
FETCH_TIMEOUT = 60.0  # seconds for the whole HTTPS fetch, connection included
RETRY_AFTER = 300.0  # seconds before a failed fetch for the same id is tried again
DNS_TIMEOUT = (2, 5, 10)
CACHE_VERSION = 1

MODES = ("enforce", "testing", "none")
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_FIELD = re.compile(r"^([A-Za-z0-9_]+):[ \t]*(.*?)[ \t]*$")


class PolicyError(Exception):
    """A policy or TXT record that does not parse, or a fetch that failed (one line)."""


@dataclass(frozen=True)
class Policy:
    """A parsed policy; ``id`` and ``fetched`` are set once it is fetched."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""
    fetched: float = 0.0

    def valid_at(self, now: float) -> bool:
        return now < self.fetched + self.max_age


class IMTASTS(Interface):
    """What the relay asks before choosing MX hosts for a domain."""

    def policy(domain: str) -> Deferred:
        """Deferred firing with the domain's ``Policy`` (mode enforce or testing),
        or None; it never errbacks."""


class IPolicyFetcher(Interface):
    """Gets a domain's policy text over HTTPS."""

    def fetch(domain: str) -> Deferred:
        """Deferred firing with the body (bytes); PolicyError on any failure."""


# -- parsing (pure) -------------------------------------------------------------------


def parse_txt(strings: list[bytes]) -> str | None:
    """The ``id`` of the one ``v=STSv1`` record among the TXT records of
    ``_mta-sts`` (each the concatenation of its strings); None when there is no
    such record, several, or a malformed one (RFC 8461 section 3.1)."""
    records = [s.decode("ascii", "replace") for s in strings]
    candidates = [r for r in records if re.match(r"^v=STSv1[ \t]*(;|$)", r)]
    if len(candidates) != 1:
        return None
    fields: dict[str, str] = {}
    for part in candidates[0].split(";")[1:]:
        key, sep, value = part.strip(" \t").partition("=")
        if sep:
            fields.setdefault(key, value)
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(body: bytes) -> Policy:
    """RFC 8461 section 3.2: ``key: value`` lines (LF or CRLF); version STSv1,
    mode, max_age and (unless mode is none) at least one mx are required;
    unknown keys are ignored, and the first of a repeated key counts."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        match = _FIELD.match(line)
        if not match:
            raise PolicyError(f"policy line does not parse: {line[:80]!r}")
        key, value = match.groups()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("policy version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"policy mode {mode[:20]!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not (age.isdigit() and len(age) <= 10):
        raise PolicyError("policy max_age is missing or not a number")
    if mode != "none" and not mx:
        raise PolicyError("policy names no mx")
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT))


def mx_allowed(policy: Policy, mx_host: str) -> bool:
    """Whether ``mx_host`` matches one of the policy's mx patterns (RFC 8461
    section 4.1): equal ignoring case and a final dot, or ``*.`` standing for
    exactly one leftmost label."""
    host = mx_host.lower().rstrip(".")
    for pattern in policy.mx:
        if pattern.startswith("*."):
            label, dot, rest = host.partition(".")
            if label and dot and rest == pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


# -- fetching -------------------------------------------------------------------------


class _LimitedBody(Protocol):
    """Collects a response body up to ``limit`` bytes, else abandons the connection."""

    def __init__(self, limit: int) -> None:
        self.finished: Deferred = Deferred(self.abandon)
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.finished.errback(PolicyError(f"policy larger than {self.limit} bytes"))
            self.abandon()
            return
        self.chunks.append(data)

    def abandon(self, _: Deferred | None = None) -> None:
        """Stop the transfer (also the canceller of ``finished``: a timeout)."""
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.finished.called:
            # A body ends with ResponseDone; anything else is a broken transfer.
            if reason.check(ResponseDone):
                self.finished.callback(b"".join(self.chunks))
            else:
                self.finished.errback(PolicyError(f"policy transfer failed: {reason.value}"))


@implementer(IStreamClientEndpoint)
class _ResolvingTLSEndpoint:
    """TLS to ``host:port`` with the address from ``twisted.names`` (A, then AAAA)."""

    def __init__(
        self, reactor: Any, resolver: IResolver, policy: BrowserLikePolicyForHTTPS, host: str, port: int
    ) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.policy = policy
        self.host = host
        self.port = port

    def connect(self, factory: Any) -> Deferred:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        # (IResolver's annotations say RRHeader where lists of them come back.)
        results: Any = await DeferredList(
            [
                self.resolver.lookupAddress(self.host, DNS_TIMEOUT),
                self.resolver.lookupIPV6Address(self.host, DNS_TIMEOUT),
            ],
            consumeErrors=True,
        )
        addresses = [
            rr.payload.dottedQuad() if rr.type == dns.A else ipaddress.ip_address(rr.payload.address).compressed
            for ok, value in results
            if ok
            for rr in value[0]
            if rr.type in (dns.A, dns.AAAA)
        ]
        if not addresses:
            raise PolicyError(f"no address for {self.host}")
        address = addresses[0]
        if ":" in address:
            tcp: Any = TCP6ClientEndpoint(self.reactor, address, self.port, timeout=int(FETCH_TIMEOUT))
        else:
            tcp = TCP4ClientEndpoint(self.reactor, address, self.port, timeout=int(FETCH_TIMEOUT))
        creator = self.policy.creatorForNetloc(self.host.encode("ascii"), self.port)
        # As endpoints.wrapClientTLS, but on our reactor's clock (TLS write
        # batching schedules on it), not the global reactor's.
        tls = await tcp.connect(TLSMemoryBIOFactory(creator, True, factory, clock=self.reactor))
        return tls.wrappedProtocol


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    def __init__(self, reactor: Any, resolver: IResolver, trust: IOpenSSLTrustRoot, port: int | None) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.policy = BrowserLikePolicyForHTTPS(trustRoot=trust)
        self.port = port

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise PolicyError("policy URL is not https")
        host = uri.host.decode("ascii")
        return _ResolvingTLSEndpoint(self.reactor, self.resolver, self.policy, host, self.port or uri.port)


def https_agent(reactor: Any, resolver: IResolver, trust: IOpenSSLTrustRoot, port: int | None = None) -> IAgent:
    """An Agent whose https connections resolve through ``resolver`` (twisted.names)
    and verify the server's certificate for the URL's host name against
    ``trust``.  ``port`` replaces the URL's port (tests serve on loopback)."""
    return Agent.usingEndpointFactory(reactor, _EndpointFactory(reactor, resolver, trust, port))


@implementer(IPolicyFetcher)
class PolicyFetcher:
    """GET ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with the limits of section 3.3."""

    def __init__(self, agent: IAgent, clock: IReactorTime, timeout: float = FETCH_TIMEOUT) -> None:
        self.agent = agent
        self.clock = clock
        self.timeout = timeout

    def fetch(self, domain: str) -> Deferred:
        d = Deferred.fromCoroutine(self._fetch(domain))
        d.addTimeout(self.timeout, self.clock)
        return d

    async def _fetch(self, domain: str) -> bytes:
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt".encode("ascii")
        response: IResponse = await self.agent.request(b"GET", url, Headers({b"user-agent": [b"mailstack MTA-STS"]}))
        if response.code != 200:
            # Redirects are not followed: RFC 8461 section 3.3.
            response.deliverBody(_Discard())
            raise PolicyError(f"policy fetch answered HTTP {response.code}")
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(_Discard())
            raise PolicyError("policy is not served as text/plain")
        if isinstance(response.length, int) and response.length > MAX_POLICY_SIZE:
            response.deliverBody(_Discard())
            raise PolicyError(f"policy larger than {MAX_POLICY_SIZE} bytes")
        body = _LimitedBody(MAX_POLICY_SIZE)
        response.deliverBody(body)
        return await body.finished


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


# -- the policy cache and the lookup ---------------------------------------------------


class PolicyCache:
    """``data_dir/mta-sts/<domain>.json``; blocking, called through ``run_blocking``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _path(self, domain: str) -> str:
        return os.path.join(self.folder, f"{domain}.json")

    def load(self, domain: str) -> Policy | None:
        try:
            raw = fsutil.read_small(self._path(domain))
            doc = json.loads(raw.decode("utf-8"))
            if doc.pop("version") != CACHE_VERSION:
                return None
            doc["mx"] = tuple(doc["mx"])
            return Policy(**doc)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None  # a damaged cache entry is fetched again

    def store(self, domain: str, policy: Policy) -> None:
        fsutil.ensure_dir(self.folder)
        doc = {"version": CACHE_VERSION, **asdict(policy), "mx": list(policy.mx)}
        fsutil.write_atomic(self._path(domain), json.dumps(doc).encode("utf-8"), mode=0o600)


@implementer(IMTASTS)
class MTASTS:
    """RFC 8461 policy discovery, fetch and cache for the relay."""

    log = Logger()

    def __init__(
        self,
        resolver: IResolver,
        fetcher: IPolicyFetcher,
        cache_dir: str,
        run_blocking: Callable[..., Deferred],
        clock: IReactorTime,
    ) -> None:
        self.resolver = resolver
        self.fetcher = fetcher
        self.disk = PolicyCache(cache_dir)
        self.run_blocking = run_blocking
        self.clock = clock
        self._memory: dict[str, Policy | None] = {}  # domain -> policy (None: none on disk)
        self._failed: dict[tuple[str, str], float] = {}  # (domain, id) -> time of the failure
        self._pending: dict[str, list[Deferred]] = {}

    def policy(self, domain: str) -> Deferred:
        """See ``IMTASTS``; concurrent calls for one domain share one lookup."""
        try:
            domain = normalize_domain(domain)
        except AddressError:
            return succeed(None)
        if domain[:1] == "[" or _is_ip(domain):
            return succeed(None)  # an address literal has no MTA-STS
        waiting = self._pending.get(domain)
        d: Deferred = Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        self._pending[domain] = [d]
        Deferred.fromCoroutine(self._lookup(domain)).addBoth(self._deliver, domain)
        return d

    def _deliver(self, result: Any, domain: str) -> None:
        if isinstance(result, Failure):
            self.log.failure("MTA-STS lookup for {domain} failed", result, domain=domain)
            result = None
        for d in self._pending.pop(domain, []):
            d.callback(result)

    async def _lookup(self, domain: str) -> Policy | None:
        now = self.clock.seconds()
        cached = await self._cached(domain)
        valid = cached if cached is not None and cached.valid_at(now) else None
        try:
            answer: Any = await self.resolver.lookupText(f"_mta-sts.{domain}", DNS_TIMEOUT)
            answers = answer[0]  # (answers, authority, additional): lists of RRHeader
            policy_id = parse_txt([b"".join(rr.payload.data) for rr in answers if rr.type == dns.TXT])
        except DNSNameError:
            policy_id = None
        except Exception as e:  # noqa: BLE001 - SERVFAIL, timeout, ...: keep what we know
            self.log.info("MTA-STS TXT lookup for {domain} failed: {error}", domain=domain, error=repr(e))
            return _effective(valid)
        if policy_id is None or (valid is not None and valid.id == policy_id):
            return _effective(valid)
        failed_at = self._failed.get((domain, policy_id))
        if failed_at is not None and now - failed_at < RETRY_AFTER:
            return _effective(valid)
        try:
            body = await self.fetcher.fetch(domain)
            fresh = replace(parse_policy(body), id=policy_id, fetched=self.clock.seconds())
        except Exception as e:  # noqa: BLE001 - any failure (TLS, HTTP, parse, timeout) is "no new policy"
            if len(self._failed) >= MEMORY_ENTRIES:
                self._failed.clear()
            self._failed[(domain, policy_id)] = now
            self.log.info("MTA-STS policy fetch for {domain} failed: {error}", domain=domain, error=str(e) or repr(e))
            return _effective(valid)
        self._failed.pop((domain, policy_id), None)
        self._memory[domain] = fresh
        await self.run_blocking(self.disk.store, domain, fresh)
        return _effective(fresh)

    async def _cached(self, domain: str) -> Policy | None:
        if domain not in self._memory:
            if len(self._memory) >= MEMORY_ENTRIES:
                self._memory.clear()  # the disk still has them
            self._memory[domain] = await self.run_blocking(self.disk.load, domain)
        return self._memory[domain]


def _effective(policy: Policy | None) -> Policy | None:
    """Mode none means no policy for the relay (RFC 8461 section 5)."""
    return policy if policy is not None and policy.mode != "none" else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def build(
    reactor: Any, resolver: IResolver, data_dir: str, ca_file: str, run_blocking: Callable[..., Deferred]
) -> MTASTS:
    """The relay's MTA-STS lookup: cache in ``data_dir/mta-sts``, fetches verified
    against the system store plus ``ca_file`` (``relay.tls_ca_file``; TrustError
    if it is unusable)."""
    agent = https_agent(reactor, resolver, trust_root(ca_file))
    return MTASTS(resolver, PolicyFetcher(agent, reactor), os.path.join(data_dir, "mta-sts"), run_blocking, reactor)
