"""Tests for mailstack.dnsresolver: which servers the shared resolver asks, and its cache."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.names import client, dns, hosts, resolve
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSServerError
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import config as configmod
from mailstack import dnsresolver
from mailstack.metrics import Metrics


class BuildTests(SynchronousTestCase):
    def test_configuredServersOnly(self) -> None:
        """With [dns] nameservers the resolver asks them (through the cache), not the hosts file."""
        cfg = configmod.from_mapping({"dns": {"nameservers": ["127.0.0.1:5353"]}})
        resolver = dnsresolver.build(cfg, Clock())
        verifyObject(IResolver, resolver)
        self.assertIsInstance(resolver, dnsresolver.CachingResolver)

    def test_relayNameserversAsFallback(self) -> None:
        """An empty [dns] nameservers falls back to relay.nameservers."""
        cfg = configmod.from_mapping({"relay": {"nameservers": ["127.0.0.1:5353"]}})
        self.assertEqual(dnsresolver.nameservers(cfg), [("127.0.0.1", 5353)])

    def test_systemResolverReadsHostsFirst(self) -> None:
        """Without configured servers, the hosts file answers before resolv.conf's servers,
        as the system resolver does (a smarthost named ``localhost`` keeps working),
        through the one cache, which never keeps its answers: an edit counts at once."""
        path = FilePath(self.mktemp())
        path.setContent(b"192.0.2.1 smarthost.lan\n")
        resolver = dnsresolver.build(configmod.from_mapping({}), Clock(), hosts_file=path.path.encode())
        self.assertIsInstance(resolver, dnsresolver.CachingResolver)
        chain = resolver.upstream
        assert isinstance(chain, resolve.ResolverChain)
        self.assertEqual([type(r) for r in chain.resolvers], [hosts.Resolver, client.Resolver])
        answer = self.successResultOf(resolver.lookupAddress(b"smarthost.lan"))
        self.assertEqual(answer[0][0].payload.dottedQuad(), "192.0.2.1")
        path.setContent(b"192.0.2.2 smarthost.lan\n")
        answer = self.successResultOf(resolver.lookupAddress(b"smarthost.lan"))
        self.assertEqual(answer[0][0].payload.dottedQuad(), "192.0.2.2")
        self.assertEqual(resolver.entries, {})


class _Upstream(ResolverBase):
    """An IResolver whose answers the test gives, one Deferred per question."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[bytes, int]] = []
        self.pending: list[Deferred] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object) -> Deferred:
        self.asked.append((name, type))
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


def _txt(name: bytes, ttl: int, text: bytes = b"v=spf1 -all") -> dns.RRHeader:
    return dns.RRHeader(name, dns.TXT, dns.IN, ttl, dns.Record_TXT(text))


def _soa(minimum: int, ttl: int) -> dns.RRHeader:
    soa = dns.Record_SOA(mname=b"ns.example.org", rname=b"h.example.org", minimum=minimum)
    return dns.RRHeader(b"example.org", dns.SOA, dns.IN, ttl, soa)


class CachingResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = _Upstream()
        self.resolver = dnsresolver.CachingResolver(self.upstream, self.clock, max_entries=3)

    def ask(self, name: bytes = b"example.org") -> Deferred:
        return self.resolver.lookupText(name)

    def test_isAResolver(self) -> None:
        """The cache stands for an IResolver wherever the server asks the DNS."""
        verifyObject(IResolver, self.resolver)
        verifyObject(IResolver, self.upstream)

    def test_answerKeptForItsLeastTTL(self) -> None:
        """An answer is given again without asking upstream until its least TTL
        has passed (names compared case-insensitively); then upstream is asked again."""
        d = self.ask()
        self.upstream.pending.pop().callback(([_txt(b"example.org", 300)], [], [_txt(b"example.org", 60)]))
        self.assertEqual(self.successResultOf(d)[0][0].payload.data, [b"v=spf1 -all"])
        self.clock.advance(59)
        again = self.successResultOf(self.ask(b"EXAMPLE.org"))
        self.assertEqual(again[0][0].payload.data, [b"v=spf1 -all"])
        self.assertEqual(len(self.upstream.asked), 1)
        self.clock.advance(1)
        self.assertNoResult(self.ask())
        self.assertEqual(len(self.upstream.asked), 2)

    def test_hitGivesTheCallersOwnLists(self) -> None:
        """A caller that changes the lists of its answer does not change the next one's."""
        self.ask()
        self.upstream.pending.pop().callback(([_txt(b"example.org", 300)], [], []))
        self.successResultOf(self.ask())[0].clear()
        self.assertEqual(len(self.successResultOf(self.ask())[0]), 1)

    def test_cachedAsksNothing(self) -> None:
        """``cached`` tells what a lookup would answer from the cache now (the
        answer in the caller's own lists, or the NXDOMAIN error), and None when a
        lookup would ask upstream, without ever asking upstream itself."""
        self.assertIsNone(self.resolver.cached(b"example.org", dns.TXT))
        self.ask()
        self.upstream.pending.pop().callback(([_txt(b"example.org", 60)], [], []))
        kept = self.resolver.cached(b"Example.ORG", dns.TXT)
        assert kept is not None and not isinstance(kept, DNSNameError)
        self.assertEqual(kept[0][0].payload.data, [b"v=spf1 -all"])
        kept[0].clear()
        self.assertEqual(len(self.successResultOf(self.ask())[0]), 1)
        gone = self.resolver.lookupText(b"gone.example")
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [_soa(minimum=30, ttl=600)]
        self.upstream.pending.pop().errback(DNSNameError(message))
        self.failureResultOf(gone, DNSNameError)
        self.assertIsInstance(self.resolver.cached(b"gone.example", dns.TXT), DNSNameError)
        self.clock.advance(60)
        self.assertIsNone(self.resolver.cached(b"example.org", dns.TXT))
        self.assertEqual(len(self.upstream.asked), 2)

    def test_nxdomainKeptForTheNegativeTTL(self) -> None:
        """NXDOMAIN is given again for min(SOA TTL, SOA minimum) (RFC 2308 section 5)."""
        d = self.ask()
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [_soa(minimum=30, ttl=600)]
        self.upstream.pending.pop().errback(DNSNameError(message))
        self.failureResultOf(d, DNSNameError)
        self.clock.advance(29)
        self.failureResultOf(self.ask(), DNSNameError)
        self.assertEqual(len(self.upstream.asked), 1)
        self.clock.advance(1)
        self.assertNoResult(self.ask())
        self.assertEqual(len(self.upstream.asked), 2)

    def test_failuresAndEmptyAnswersNotKept(self) -> None:
        """SERVFAIL/timeouts and answers without any record are asked again next time."""
        d = self.ask()
        self.upstream.pending.pop().errback(DNSServerError("SERVFAIL"))
        self.failureResultOf(d, DNSServerError)
        d = self.ask()
        self.upstream.pending.pop().callback(([], [], []))
        self.assertEqual(self.successResultOf(d), ([], [], []))
        self.assertNoResult(self.ask())
        self.assertEqual(len(self.upstream.asked), 3)

    def test_boundedOldestDropped(self) -> None:
        """At most max_entries names are kept; a new one drops the oldest."""
        for name in (b"a.example", b"b.example", b"c.example", b"d.example"):
            self.ask(name)
            self.upstream.pending.pop().callback(([_txt(name, 300)], [], []))
        self.assertEqual(len(self.resolver.entries), 3)
        self.successResultOf(self.ask(b"d.example"))
        self.assertNoResult(self.ask(b"a.example"))
        self.assertEqual(self.upstream.asked[-1], (b"a.example", dns.TXT))

    def test_lookupsTimedHitsNot(self) -> None:
        """``dns_lookup_seconds`` observes every question that went upstream (for the
        time its answer or failure took), and none that the cache answered."""
        metrics = Metrics()
        self.resolver.metrics = metrics
        d = self.ask()
        self.clock.advance(0.003)
        self.upstream.pending.pop().callback(([_txt(b"example.org", 300)], [], []))
        self.successResultOf(d)
        self.successResultOf(self.ask())
        d = self.resolver.lookupText(b"broken.example")
        self.clock.advance(2)
        self.upstream.pending.pop().errback(DNSServerError("SERVFAIL"))
        self.failureResultOf(d, DNSServerError)
        text = metrics.exposition().decode()
        self.assertIn("mailstack_dns_lookup_seconds_count 2.0", text)
        self.assertIn('mailstack_dns_lookup_seconds_bucket{le="0.005"} 1.0', text)
