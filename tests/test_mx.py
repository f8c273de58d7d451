"""MX ordering (pure, by table) and the twisted.names-backed Resolver."""

from __future__ import annotations

import random

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSQueryTimeoutError, DNSServerError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import config as configmod
from mailstack.dnsresolver import CachingResolver
from mailstack.errors import PermanentFailure, TemporaryFailure
from mailstack.interfaces import IMXResolver
from mailstack.mx import (
    ADDRESS_DEADLINE,
    Host,
    Resolver,
    literal_address,
    order_hosts,
    split_hostport,
)


class FakeResolver(ResolverBase):
    """Answers from ``records``: {(name, type): [payload] | Exception class}."""

    def __init__(self, records):
        ResolverBase.__init__(self)
        self.records = records
        self.queries = []

    def _lookup(self, name, cls, qtype, timeout):
        name = name.decode() if isinstance(name, bytes) else name
        self.queries.append((name, qtype))
        rrs = self.records.get((name, qtype))
        if rrs is None:
            if any(n == name for n, _ in self.records):
                # NOERROR, no data: with the zone's SOA, whose TTL says how long to keep it (RFC 2308).
                soa = dns.Record_SOA(mname=b"ns.test", rname=b"root.test", minimum=60, ttl=60)
                return succeed(([], [dns.RRHeader(name, dns.SOA, cls, 60, soa)], []))
            return fail(DNSNameError(name))
        if isinstance(rrs, type) and issubclass(rrs, Exception):
            return fail(rrs(name))
        return succeed(([dns.RRHeader(name, qtype, cls, 60, p) for p in rrs], [], []))


def mx(pref, name):
    return dns.Record_MX(pref, name.encode())


class OrderHostsTests(SynchronousTestCase):
    def test_preferenceOrder(self) -> None:
        """Hosts come in ascending preference."""
        hosts = order_hosts("d.test", [(20, "b.d.test"), (10, "a.d.test"), (30, "c.d.test")], random.Random(0))
        self.assertEqual([h.name for h in hosts], ["a.d.test", "b.d.test", "c.d.test"])
        self.assertEqual([h.preference for h in hosts], [10, 20, 30])

    def test_equalPreferenceShuffled(self) -> None:
        """Equal preferences are shuffled by the rng; lower preferences stay first."""
        records = [(10, f"m{i}.d.test") for i in range(6)] + [(5, "first.d.test"), (50, "last.d.test")]
        orders = set()
        for seed in range(20):
            hosts = order_hosts("d.test", records, random.Random(seed))
            names = [h.name for h in hosts]
            self.assertEqual(names[0], "first.d.test")
            self.assertEqual(names[-1], "last.d.test")
            self.assertEqual(sorted(names[1:-1]), [f"m{i}.d.test" for i in range(6)])
            orders.add(tuple(names))
        self.assertGreater(len(orders), 5)
        # the same seed gives the same order
        self.assertEqual(
            order_hosts("d.test", records, random.Random(3)), order_hosts("d.test", records, random.Random(3))
        )

    def test_noMXImplicit(self) -> None:
        """No MX records: the domain itself (RFC 5321 5.1)."""
        self.assertEqual(order_hosts("d.test", [], random.Random(0)), [Host("d.test", None, 0)])

    def test_nullMX(self) -> None:
        """A null MX (RFC 7505) is a permanent 556 5.1.10."""
        for name in (".", ""):
            e = self.assertRaises(PermanentFailure, order_hosts, "d.test", [(0, name)], random.Random(0))
            self.assertEqual((e.reply.code, e.reply.enhanced), (556, "5.1.10"))

    def test_nullMXAmongOthersIgnored(self) -> None:
        """A "." next to real exchanges is ignored."""
        hosts = order_hosts("d.test", [(0, "."), (10, "mx.d.test.")], random.Random(0))
        self.assertEqual([h.name for h in hosts], ["mx.d.test"])

    def test_ourselvesListed(self) -> None:
        """Only exchanges preferred over our own hostname are kept; none is a loop."""
        recs = [(10, "a.d.test"), (20, "me.test"), (30, "c.d.test")]
        hosts = order_hosts("d.test", recs, random.Random(0), ["me.test"])
        self.assertEqual([h.name for h in hosts], ["a.d.test"])
        e = self.assertRaises(PermanentFailure, order_hosts, "d.test", [(10, "me.test")], random.Random(0), ["me.test"])
        self.assertEqual(e.reply.enhanced, "5.4.6")

    def test_duplicates(self) -> None:
        """A name listed twice is tried once, at its best preference."""
        hosts = order_hosts("d.test", [(20, "a.d.test"), (10, "A.d.test.")], random.Random(0))
        self.assertEqual(hosts, [Host("a.d.test", None, 10)])

    def test_helpers(self) -> None:
        """Address literals and host:port strings are parsed."""
        self.assertEqual(literal_address("[192.0.2.1]"), "192.0.2.1")
        self.assertEqual(literal_address("[IPv6:2001:db8::1]"), "2001:db8::1")
        self.assertIsNone(literal_address("d.test"))
        self.assertEqual(split_hostport("smtp.test:587", 25), ("smtp.test", 587))
        self.assertEqual(split_hostport("[::1]:2525", 25), ("::1", 2525))
        self.assertEqual(split_hostport("smtp.test", 25), ("smtp.test", 25))


def mx_resolver(config: configmod.Config, clock: Clock, upstream: ResolverBase) -> Resolver:
    """The MX resolver over ``upstream`` behind the server's cache, as ``dnsresolver.build`` makes it."""
    return Resolver(config, clock, CachingResolver(upstream, clock), rng=random.Random(0))


class ResolverTests(SynchronousTestCase):
    def resolver(self, records) -> Resolver:
        config = configmod.from_mapping({"hostname": "me.test"})
        self.fake = FakeResolver(records)
        return mx_resolver(config, Clock(), self.fake)

    def test_interface(self) -> None:
        """Resolver provides IMXResolver."""
        verifyObject(IMXResolver, self.resolver({}))

    def test_mxWithAddresses(self) -> None:
        """MX hosts come in order with their A and AAAA addresses."""
        r = self.resolver(
            {
                ("d.test", dns.MX): [mx(20, "backup.d.test"), mx(10, "primary.d.test")],
                ("primary.d.test", dns.A): [dns.Record_A("192.0.2.1")],
                ("primary.d.test", dns.AAAA): [dns.Record_AAAA("2001:db8::1")],
                ("backup.d.test", dns.A): [dns.Record_A("192.0.2.2")],
            }
        )
        hosts = self.successResultOf(r.hosts_for("d.test"))
        self.assertEqual(
            hosts,
            [
                Host("primary.d.test", ("192.0.2.1", "2001:db8::1"), 10),
                Host("backup.d.test", ("192.0.2.2",), 20),
            ],
        )

    def test_aFallback(self) -> None:
        """No MX records: the domain's own A/AAAA addresses."""
        r = self.resolver({("d.test", dns.A): [dns.Record_A("192.0.2.9")]})
        self.assertEqual(self.successResultOf(r.hosts_for("d.test")), [Host("d.test", ("192.0.2.9",), 0)])

    def test_nullMX(self) -> None:
        """A null MX is a permanent failure 556 5.1.10."""
        r = self.resolver({("d.test", dns.MX): [mx(0, "")]})
        f = self.failureResultOf(r.hosts_for("d.test"), PermanentFailure)
        self.assertEqual(f.value.reply.code, 556)

    def test_nxdomain(self) -> None:
        """NXDOMAIN is permanent (550 5.1.2)."""
        r = self.resolver({})
        f = self.failureResultOf(r.hosts_for("nowhere.test"), PermanentFailure)
        self.assertEqual(f.value.reply.enhanced, "5.1.2")

    def test_servfail(self) -> None:
        """SERVFAIL is temporary (451 4.4.3)."""
        r = self.resolver({("d.test", dns.MX): DNSServerError})
        f = self.failureResultOf(r.hosts_for("d.test"), TemporaryFailure)
        self.assertEqual(f.value.reply.enhanced, "4.4.3")

    def test_timeout(self) -> None:
        """A DNS timeout is temporary."""
        r = self.resolver({("d.test", dns.MX): DNSQueryTimeoutError})
        self.failureResultOf(r.hosts_for("d.test"), TemporaryFailure)

    def test_noAddressAnywhere(self) -> None:
        """The domain exists but has neither MX nor address: permanent 5.4.4."""
        r = self.resolver({("d.test", dns.TXT): [dns.Record_TXT(b"x")]})
        f = self.failureResultOf(r.hosts_for("d.test"), PermanentFailure)
        self.assertEqual(f.value.reply.enhanced, "5.4.4")

    def test_mxHostsUnresolvableTemporary(self) -> None:
        """MX hosts whose address lookups fail temporarily: temporary failure."""
        r = self.resolver(
            {
                ("d.test", dns.MX): [mx(10, "a.d.test")],
                ("a.d.test", dns.A): DNSServerError,
                ("a.d.test", dns.AAAA): DNSServerError,
            }
        )
        self.failureResultOf(r.hosts_for("d.test"), TemporaryFailure)

    def test_oneHostUnresolvable(self) -> None:
        """A host without addresses stays in the list (empty); others are usable."""
        r = self.resolver(
            {
                ("d.test", dns.MX): [mx(10, "gone.d.test"), mx(20, "b.d.test")],
                ("b.d.test", dns.A): [dns.Record_A("192.0.2.2")],
            }
        )
        hosts = self.successResultOf(r.hosts_for("d.test"))
        self.assertEqual(hosts, [Host("gone.d.test", (), 10), Host("b.d.test", ("192.0.2.2",), 20)])

    def test_literal(self) -> None:
        """An address literal needs no DNS."""
        r = self.resolver({})
        self.assertEqual(self.successResultOf(r.hosts_for("[192.0.2.5]")), [Host("[192.0.2.5]", ("192.0.2.5",), 0)])
        self.assertEqual(self.fake.queries, [])


class CacheTests(SynchronousTestCase):
    def test_answersCachedForTTL(self) -> None:
        """A second lookup within the TTL asks no DNS; after it, DNS again; shuffling still happens."""
        clock = Clock()
        fake = FakeResolver(
            {
                ("d.test", dns.MX): [mx(10, "a.d.test"), mx(10, "b.d.test")],
                ("a.d.test", dns.A): [dns.Record_A("192.0.2.1")],
                ("b.d.test", dns.A): [dns.Record_A("192.0.2.2")],
            }
        )
        r = mx_resolver(configmod.from_mapping({}), clock, fake)
        orders = set()
        for _ in range(10):
            hosts = self.successResultOf(r.hosts_for("d.test"))
            orders.add(tuple(h.name for h in hosts))
        self.assertEqual(len(fake.queries), 5)  # MX, then A and AAAA of both hosts
        self.assertEqual(len(orders), 2)
        clock.advance(61)  # FakeResolver's records have a TTL of 60 s
        self.successResultOf(r.hosts_for("d.test"))
        self.assertEqual(len(fake.queries), 10)

    def test_cachedAnswerAtOnce(self) -> None:
        """With every answer cached, hosts_for has fired when it returns, arms no
        deadline timer, and gives what the lookups gave."""
        clock = Clock()
        fake = FakeResolver(
            {
                ("d.test", dns.MX): [mx(10, "a.d.test"), mx(20, "[192.0.2.9]")],
                ("a.d.test", dns.A): [dns.Record_A("192.0.2.1"), dns.Record_A("192.0.2.1")],
                ("a.d.test", dns.AAAA): [dns.Record_AAAA("2001:db8::1")],
            }
        )
        r = mx_resolver(configmod.from_mapping({}), clock, fake)
        first = self.successResultOf(r.hosts_for("d.test"))
        asked = len(fake.queries)
        armed: list[float] = []
        call_later = clock.callLater
        clock.callLater = lambda delay, *a, **kw: armed.append(delay) or call_later(delay, *a, **kw)  # type: ignore
        self.assertEqual(self.successResultOf(r.hosts_for("d.test")), first)
        expected = [Host("a.d.test", ("192.0.2.1", "2001:db8::1"), 10), Host("[192.0.2.9]", ("192.0.2.9",), 20)]
        self.assertEqual(first, expected)
        self.assertEqual((len(fake.queries), armed), (asked, []))

    def test_cachedMXAddressesExpired(self) -> None:
        """An MX answer still cached whose hosts' addresses have expired: only the
        addresses are asked again."""
        clock = Clock()
        fake = TTLResolver(
            {
                ("d.test", dns.MX): [mx(10, "a.d.test")],
                ("a.d.test", dns.A): [dns.Record_A("192.0.2.1")],
                ("a.d.test", dns.AAAA): [dns.Record_AAAA("2001:db8::1")],
            },
            {"d.test": 600},
        )
        r = mx_resolver(configmod.from_mapping({}), clock, fake)
        self.successResultOf(r.hosts_for("d.test"))
        del fake.queries[:]
        clock.advance(59)
        self.successResultOf(r.hosts_for("d.test"))
        self.assertEqual(fake.queries, [])
        clock.advance(2)
        hosts = self.successResultOf(r.hosts_for("d.test"))
        self.assertEqual(hosts, [Host("a.d.test", ("192.0.2.1", "2001:db8::1"), 10)])
        self.assertEqual(sorted(fake.queries), [("a.d.test", dns.A), ("a.d.test", dns.AAAA)])

    def test_hostGivenAsAddress(self) -> None:
        """An MX host that is an IP address (v4 or v6) is its own address; a name that
        starts with a digit is looked up."""
        fake = FakeResolver(
            {
                ("d.test", dns.MX): [mx(10, "192.0.2.5"), mx(20, "2001:db8::5"), mx(30, "1and1.test")],
                ("1and1.test", dns.A): [dns.Record_A("192.0.2.6")],
            }
        )
        r = mx_resolver(configmod.from_mapping({}), Clock(), fake)
        for _ in range(2):  # from the DNS, then from the cache
            hosts = self.successResultOf(r.hosts_for("d.test"))
            expected = [("192.0.2.5", "192.0.2.5"), ("2001:db8::5", "2001:db8::5"), ("1and1.test", "192.0.2.6")]
            self.assertEqual([(h.name, *(h.addresses or ())) for h in hosts], expected)
        self.assertEqual(sorted(n for n, t in fake.queries if t != dns.MX), ["1and1.test", "1and1.test"])

    def test_cachedNullMX(self) -> None:
        """A cached null MX fails at once, as permanently as the first time."""
        fake = FakeResolver({("d.test", dns.MX): [mx(0, "")]})
        r = mx_resolver(configmod.from_mapping({}), Clock(), fake)
        for _ in range(2):
            f = self.failureResultOf(r.hosts_for("d.test"), PermanentFailure)
            self.assertEqual(f.value.reply.enhanced, "5.1.10")
        self.assertEqual(fake.queries, [("d.test", dns.MX)])

    def test_unencodableNameTemporary(self) -> None:
        """A domain the DNS cannot take (a label over 63 octets) is a temporary DNS
        failure, as before the cache is asked, not an error of the caller's."""
        fake = FakeResolver({})
        r = mx_resolver(configmod.from_mapping({}), Clock(), fake)
        f = self.failureResultOf(r.hosts_for("x" * 64 + ".test"), TemporaryFailure)
        self.assertEqual(f.value.reply.enhanced, "4.4.3")

    def test_failuresNotCached(self) -> None:
        """A SERVFAIL is asked again next time."""
        fake = FakeResolver({("d.test", dns.MX): DNSServerError})
        r = mx_resolver(configmod.from_mapping({}), Clock(), fake)
        self.failureResultOf(r.hosts_for("d.test"), TemporaryFailure)
        self.failureResultOf(r.hosts_for("d.test"), TemporaryFailure)
        self.assertEqual(len(fake.queries), 2)


class TTLResolver(FakeResolver):
    """FakeResolver whose records of the names in ``ttls`` have that TTL (else 60 s)."""

    def __init__(self, records, ttls):
        FakeResolver.__init__(self, records)
        self.ttls = ttls

    def _lookup(self, name, cls, qtype, timeout):
        d = FakeResolver._lookup(self, name, cls, qtype, timeout)
        text = name.decode() if isinstance(name, bytes) else name
        if text in self.ttls:
            ttl = self.ttls[text]
            d.addCallback(lambda r: ([dns.RRHeader(text, rr.type, cls, ttl, rr.payload) for rr in r[0]], [], []))
        return d


class SilentResolver(FakeResolver):
    """Answers MX from ``records``; address queries of the names in ``silent`` never answer."""

    def __init__(self, records, silent):
        FakeResolver.__init__(self, records)
        self.silent = set(silent)
        self.hanging = []

    def _lookup(self, name, cls, qtype, timeout):
        text = name.decode() if isinstance(name, bytes) else name
        if text in self.silent:
            self.queries.append((text, qtype))
            d = Deferred()
            self.hanging.append(d)
            return d
        return FakeResolver._lookup(self, name, cls, qtype, timeout)


class DeadlineTests(SynchronousTestCase):
    def test_silentMXHostsCostOneDeadline(self) -> None:
        """Twenty MX hosts whose address lookups never answer: only relay.max_mx_hosts (5)
        are looked up, all at once, and the attempt ends with a temporary failure at
        ADDRESS_DEADLINE -- not after twenty lookup timeouts in a row."""
        clock = Clock()
        names = [f"m{i:02}.d.test" for i in range(20)]
        fake = SilentResolver({("d.test", dns.MX): [mx(10 + i, n) for i, n in enumerate(names)]}, names)
        verifyObject(IResolver, fake)
        r = mx_resolver(configmod.from_mapping({}), clock, fake)
        d = r.hosts_for("d.test")
        self.assertNoResult(d)
        asked = sorted({n for n, t in fake.queries if t in (dns.A, dns.AAAA)})
        self.assertEqual(asked, names[:5])  # in parallel: all five before any answer
        clock.advance(ADDRESS_DEADLINE - 0.1)
        self.assertNoResult(d)
        clock.advance(0.1)
        f = self.failureResultOf(d, TemporaryFailure)
        self.assertEqual(f.value.reply.enhanced, "4.4.3")

    def test_answeredHostsKeptAtDeadline(self) -> None:
        """At the deadline the hosts that did answer are used; the silent ones have no address."""
        clock = Clock()
        fake = SilentResolver(
            {
                ("d.test", dns.MX): [mx(10, "slow.d.test"), mx(20, "ok.d.test")],
                ("ok.d.test", dns.A): [dns.Record_A("192.0.2.7")],
            },
            ["slow.d.test"],
        )
        r = mx_resolver(configmod.from_mapping({"relay": {"max_mx_hosts": 2}}), clock, fake)
        d = r.hosts_for("d.test")
        self.assertNoResult(d)
        clock.advance(ADDRESS_DEADLINE)
        self.assertEqual(self.successResultOf(d), [Host("slow.d.test", (), 10), Host("ok.d.test", ("192.0.2.7",), 20)])

    def test_maxMXHosts(self) -> None:
        """relay.max_mx_hosts caps the hosts returned (and looked up)."""
        records = {("d.test", dns.MX): [mx(i, f"h{i}.d.test") for i in range(1, 9)]}
        for i in range(1, 9):
            records[(f"h{i}.d.test", dns.A)] = [dns.Record_A(f"192.0.2.{i}")]
        fake = FakeResolver(records)
        r = mx_resolver(configmod.from_mapping({"relay": {"max_mx_hosts": 3}}), Clock(), fake)
        hosts = self.successResultOf(r.hosts_for("d.test"))
        self.assertEqual([h.name for h in hosts], ["h1.d.test", "h2.d.test", "h3.d.test"])
        self.assertEqual(sorted({n for n, t in fake.queries if t == dns.A}), ["h1.d.test", "h2.d.test", "h3.d.test"])
