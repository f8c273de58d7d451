"""The inbound checks as pipeline stages (mailstack/checks/: dnsbl, clientrate,
greylisting, spf, dkimverify, dmarc, authresults, rspamd, inbound) and the
shared resolver (mailstack/dnsresolver.py), on fakes, a Clock and an in-memory zone."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack import config as configmod
from mailstack import dnsresolver
from mailstack.address import Address
from mailstack.checks import clientrate, inbound
from mailstack.checks.authresults import AuthResultsCheck
from mailstack.checks.clientrate import ClientRateCheck
from mailstack.checks.dkimverify import DKIMCheck
from mailstack.checks.dmarc import DMARCCheck
from mailstack.checks.dnsbl import DNSBLCheck
from mailstack.checks.greylisting import GreylistCheck
from mailstack.checks.rspamd import RspamdCheck
from mailstack.checks.spf import SPFCheck
from mailstack.inbound.dkimverify import DKIMVerifier
from mailstack.inbound.dmarc import DMARCEvaluator
from mailstack.inbound.interfaces import (
    IDNSBLChecker,
    IGreylist,
    IRspamdClient,
    ISPFVerifier,
)
from mailstack.inbound.rspamd import RspamdUnavailable, verdict_from
from mailstack.inbound.spf import SPFResult
from mailstack.interfaces import IMessageCheck, IRateLimit
from mailstack.pipeline import Connection, Pipeline, Transaction, Verdict
from tests.support.dnsserver import ZoneResolver
from tests.support.fakes import FakeMessage
from tests.support.runtime import fake_runtime

BOB = Address("bob", "sender.test")
ALICE = Address("alice", "localhost")


def mx_conn(peer: str = "192.0.2.7") -> Connection:
    return Connection(peer=peer, listener="smtp", hostname="mx.test", helo="client.test")


def txn(sender: Address | None = BOB) -> Transaction:
    return Transaction(sender=sender, params={})


@implementer(IDNSBLChecker)
class FakeDNSBL:
    def __init__(self, zone: str | None) -> None:
        self.zone = zone

    def listed(self, ip: str) -> Deferred:
        return succeed(self.zone)


@implementer(IGreylist)
class FakeGreylist:
    def __init__(self, passed: bool) -> None:
        self.passed = passed
        self.asked: list[tuple[str, str, str]] = []

    def check(self, ip: str, sender: str, recipient: str) -> Deferred:
        self.asked.append((ip, sender, recipient))
        return succeed(self.passed)


@implementer(ISPFVerifier)
class FakeSPF:
    def __init__(self, answer: Deferred) -> None:
        self.answer = answer

    def check(self, ip: str, mail_from: str, helo: str) -> Deferred:
        return self.answer


@implementer(IRspamdClient)
class FakeRspamd:
    url = "http://127.0.0.1:11333"

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def scan(self, message: Any, envelope: Any) -> Deferred:
        return fail(self.answer) if isinstance(self.answer, Exception) else succeed(verdict_from(self.answer))


class FakesTests(SynchronousTestCase):
    def test_fakesProvideTheirInterfaces(self):
        """Every fake here provides the interface it stands for, and every check IMessageCheck."""
        verifyObject(IDNSBLChecker, FakeDNSBL(None))
        verifyObject(IGreylist, FakeGreylist(True))
        verifyObject(ISPFVerifier, FakeSPF(Deferred()))
        verifyObject(IRspamdClient, FakeRspamd({}))
        for check in inbound.build(fake_runtime(configmod.from_mapping({})), ZoneResolver({}), None, None):
            verifyObject(IMessageCheck, check)


class DNSBLCheckTests(SynchronousTestCase):
    def test_listedRefusedNamingTheList(self):
        """A listed client gets 554 5.7.1 naming the list, and the documented log line."""
        with capturedLogs() as events:
            reply = self.successResultOf(DNSBLCheck(FakeDNSBL("zen.test")).connect(mx_conn()))
        self.assertEqual((reply.code, reply.enhanced), (554, "5.7.1"))
        self.assertIn("zen.test", reply.text)
        self.assertIn(
            'inbound refused peer=192.0.2.7 check=dnsbl reason="listed in zen.test"',
            [e["log_format"].format(**e) for e in events],
        )

    def test_unlistedGoesOn(self):
        """An unlisted client is greeted."""
        self.assertIsNone(self.successResultOf(DNSBLCheck(FakeDNSBL(None)).connect(mx_conn())))


class ClientRateTests(SynchronousTestCase):
    def test_overTheLimitTempfails(self):
        """The third MAIL within a minute from one address gets 451 4.7.1 at a limit of 2;
        another address and the same one a minute later are served."""
        clock = Clock()
        check = ClientRateCheck(clientrate.limiter(clock, 2), 2)
        verifyObject(IRateLimit, check.counts)
        self.assertIsNone(self.successResultOf(check.mail(mx_conn(), txn())))
        self.assertIsNone(self.successResultOf(check.mail(mx_conn(), txn())))
        reply = self.successResultOf(check.mail(mx_conn(), txn()))
        self.assertEqual((reply.code, reply.enhanced), (451, "4.7.1"))
        self.assertIsNone(self.successResultOf(check.mail(mx_conn("192.0.2.8"), txn())))
        clock.advance(61)
        self.assertIsNone(self.successResultOf(check.mail(mx_conn(), txn())))


class GreylistCheckTests(SynchronousTestCase):
    def test_unknownTripletTempfails(self):
        """A triplet the greylist does not pass gets 451 4.7.1; the lookup keys are lower-case addresses."""
        table = FakeGreylist(False)
        reply = self.successResultOf(GreylistCheck(table).rcpt(mx_conn(), txn(), Address("Alice", "localhost")))
        self.assertEqual((reply.code, reply.enhanced), (451, "4.7.1"))
        self.assertEqual(table.asked, [("192.0.2.7", "bob@sender.test", "alice@localhost")])

    def test_passedTripletGoesOn(self):
        """A passed triplet is accepted; <> is asked as the empty sender."""
        table = FakeGreylist(True)
        self.assertIsNone(self.successResultOf(GreylistCheck(table).rcpt(mx_conn(), txn(None), ALICE)))
        self.assertEqual(table.asked[0][1], "")


class SPFCheckTests(SynchronousTestCase):
    def test_resultKeptForLaterChecks(self):
        """MAIL starts the evaluation without waiting; end of data leaves the result in txn.notes["spf"]."""
        t = txn()
        result = SPFResult("pass", "mailfrom", "sender.test", "bob@sender.test")
        check = SPFCheck(FakeSPF(succeed(result)), Clock())
        self.assertIsNone(check.mail(mx_conn(), t))
        self.assertIsNone(self.successResultOf(check.data(mx_conn(), t, FakeMessage(b""))))
        self.assertEqual(t.notes["spf"], result)

    def test_deadlineIsTemperror(self):
        """An evaluation still running after 20 s (RFC 7208 4.6.4) is temperror, never a refusal."""
        clock = Clock()
        check = SPFCheck(FakeSPF(Deferred()), clock)
        t = txn()
        check.mail(mx_conn(), t)
        d = check.data(mx_conn(), t, FakeMessage(b""))
        self.assertNoResult(d)
        clock.advance(20)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual((t.notes["spf"].result, t.notes["spf"].domain), ("temperror", "sender.test"))


ZONE = {
    "_dmarc.reject.test": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.quarantine.test": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.half.test": [("TXT", "v=DMARC1; p=reject; pct=50")],
}


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def dmarc(domain: str, spf: str = "fail", rng: float = 0.0) -> tuple[Any, Transaction]:
    t = txn()
    t.notes["spf"] = SPFResult(spf, "mailfrom", domain, f"bob@{domain}")
    check = DMARCCheck(DMARCEvaluator(ZoneResolver(ZONE), FixedRandom(rng)))
    return check.data(mx_conn(), t, FakeMessage(f"From: Bob\r\n <bob@{domain}>\r\n\r\n".encode())), t


class DMARCCheckTests(SynchronousTestCase):
    def test_rejectRefuses(self):
        """p=reject with no aligned pass: 550 5.7.1."""
        d, t = dmarc("reject.test")
        verdict = self.successResultOf(d)
        self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (550, "5.7.1"))
        self.assertEqual(t.notes["dmarc"].result, "fail")

    def test_alignedSpfPasses(self):
        """An aligned SPF pass (From folded over two lines) is dmarc=pass and accepted."""
        d, t = dmarc("reject.test", spf="pass")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(t.notes["dmarc"].result, "pass")

    def test_quarantineTags(self):
        """p=quarantine failing: X-Spam: yes is added."""
        d, _ = dmarc("quarantine.test")
        self.assertEqual(self.successResultOf(d), Verdict(prepend=(b"X-Spam: yes\r\n",)))

    def test_pctUsesTheRng(self):
        """pct=50: a draw above 50 % applies the next weaker policy (quarantine), below it reject."""
        d, _ = dmarc("half.test", rng=0.7)
        self.assertEqual(self.successResultOf(d).prepend, (b"X-Spam: yes\r\n",))
        d, _ = dmarc("half.test", rng=0.2)
        self.assertEqual(self.successResultOf(d).reply.code, 550)

    def test_noFromIsPermerror(self):
        """A message without From is reported as dmarc=permerror and accepted."""
        t = txn()
        check = DMARCCheck(DMARCEvaluator(ZoneResolver(ZONE), FixedRandom(0)))
        self.assertIsNone(check.data(mx_conn(), t, FakeMessage(b"Subject: x\r\n\r\n")))
        self.assertEqual(t.notes["dmarc"].result, "permerror")


class DKIMCheckTests(SynchronousTestCase):
    def test_unsignedSettledWithoutPool(self):
        """A message without a DKIM-Signature field has no DKIM results and costs
        no thread pool call; a signed one is read through the pool."""

        class Counting(FakeMessage):
            reads = 0

            def run_blocking(self, reader: Any) -> Deferred:
                Counting.reads += 1
                return super().run_blocking(reader)

        check = DKIMCheck(DKIMVerifier(ZoneResolver({}), lambda f, *a: succeed(f(*a))))
        t = txn()
        self.assertIsNone(check.data(mx_conn(), t, Counting(b"From: a@sender.test\r\nSubject: x\r\n\r\nhi\r\n")))
        self.assertEqual((t.notes["dkim"], Counting.reads), ([], 0))
        signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=sel; h=from; bh=x; b=y\r\n"
        self.successResultOf(check.data(mx_conn(), t, Counting(signed + b"From: a@sender.test\r\n\r\nhi\r\n")))
        self.assertEqual([r.domain for r in t.notes["dkim"]], ["sender.test"])
        self.assertGreater(Counting.reads, 0)


class AuthResultsTests(SynchronousTestCase):
    def test_fieldAndForgedRemoval(self):
        """The field names our hostname and the results; only fields claiming our hostname are removed."""
        t = txn()
        t.notes["spf"] = SPFResult("pass", "mailfrom", "sender.test", "bob@sender.test")
        verdict = AuthResultsCheck("mx.test", True, True, False).data(mx_conn(), t, FakeMessage(b""))
        self.assertEqual(len(verdict.prepend), 1)
        field = verdict.prepend[0].decode()
        self.assertTrue(field.startswith("Authentication-Results: mx.test;"))
        self.assertIn("spf=pass smtp.mailfrom=bob@sender.test", field)
        self.assertIn("dkim=none", field)
        self.assertNotIn("dmarc", field)
        self.assertTrue(verdict.remove("Authentication-Results", b"Authentication-Results: MX.test; spf=pass\r\n"))
        self.assertFalse(verdict.remove("Authentication-Results", b"Authentication-Results: other.test; spf=pass\r\n"))


class RspamdCheckTests(SynchronousTestCase):
    def data(self, answer: Any, tempfail: bool = True, t: Transaction | None = None) -> Any:
        check = RspamdCheck(FakeRspamd(answer), tempfail)
        return self.successResultOf(check.data(mx_conn(), t or txn(), FakeMessage(b"Subject: s\r\n\r\nbody\r\n")))

    def test_actions(self):
        """reject -> 550 5.7.1; soft reject and greylist -> 451 4.7.1; no action -> accepted."""
        self.assertEqual(self.data({"action": "reject"}).reply.code, 550)
        self.assertEqual(self.data({"action": "soft reject"}).reply.enhanced, "4.7.1")
        self.assertEqual(self.data({"action": "greylist"}).reply.code, 451)
        self.assertIsNone(self.data({"action": "no action"}))

    def test_addHeaderTags(self):
        """add header: X-Spam: yes and the score; not twice when DMARC tagged already."""
        verdict = self.data({"action": "add header", "score": 7.5, "required_score": 15})
        self.assertEqual(verdict.prepend, (b"X-Spam: yes\r\n", b"X-Spam-Score: 7.50 / 15.00\r\n"))
        t = txn()
        t.notes["x-spam"] = True
        self.assertEqual(self.data({"action": "add header"}, t=t).prepend, (b"X-Spam-Score: 0.00 / 0.00\r\n",))

    def test_unavailable(self):
        """rspamd down: 451 4.7.1 with tempfail, accepted with accept."""
        self.assertEqual(self.data(RspamdUnavailable("down")).reply.code, 451)
        self.assertIsNone(self.data(RspamdUnavailable("down"), tempfail=False))


class BuildTests(SynchronousTestCase):
    def build(self, **keys: Any) -> list:
        """The checks of ``[inbound]`` ``keys``, given counts and a table as the state gives them."""
        cfg = configmod.from_mapping({"inbound": keys, "data_dir": self.mktemp()})
        self.counts, self.table = clientrate.limiter(Clock(), 1), FakeGreylist(True)
        return inbound.build(fake_runtime(cfg), ZoneResolver({}), self.counts, self.table)

    def test_defaults(self):
        """By default SPF, DKIM, DMARC and Authentication-Results run."""
        self.assertEqual([c.name for c in self.build()], ["spf", "dkim", "dmarc", "authresults"])

    def test_everything(self):
        """Every key on: the checks in stage order, asking the shared counts and greylist table."""
        built = self.build(
            dnsbl=["bl.test"], greylist="5m", rspamd="http://127.0.0.1:11333", max_messages_per_minute=60
        )
        self.assertEqual(
            [c.name for c in built],
            ["dnsbl", "rate", "spf", "greylist", "dkim", "dmarc", "authresults", "rspamd"],
        )
        by_name = {c.name: c for c in built}
        self.assertEqual((by_name["rate"].counts, by_name["rate"].limit), (self.counts, 60))
        self.assertIs(by_name["greylist"].greylist, self.table)

    def test_sharedStateRequired(self):
        """A rate limit or greylisting without the shared counts or table is a
        programming error, not a check keeping counts of its own."""
        for keys in ({"max_messages_per_minute": 60}, {"greylist": "5m"}):
            cfg = configmod.from_mapping({"inbound": keys, "data_dir": self.mktemp()})
            self.assertRaises(ValueError, inbound.build, fake_runtime(cfg), ZoneResolver({}), None, None)

    def test_authenticatedSessionsExempt(self):
        """No inbound check runs at any stage of an authenticated session."""
        built = self.build(
            dnsbl=["bl.test"], greylist="5m", rspamd="http://127.0.0.1:11333", max_messages_per_minute=60
        )
        pipeline = Pipeline(built, Clock())
        authed = Connection(peer="192.0.2.7", listener="smtp", hostname="mx.test", user="alice@localhost")
        for stage in ("connect", "mail", "rcpt", "data"):
            self.assertEqual(pipeline.stages(authed, stage), ())
            self.assertEqual(pipeline.stages(Connection("192.0.2.7", "submission", "mx.test"), stage), ())

    def test_configValidation(self):
        """Bad [inbound] values stop the start naming the key."""
        for key, bad in [
            ("dnsbl", "zen"),
            ("dnsbl", ["not a zone"]),
            ("greylist", "5"),
            ("rspamd", "ftp://x"),
            ("rspamd_failure", "drop"),
            ("max_messages_per_minute", -1),
            ("spf", "yes"),
        ]:
            with self.assertRaises(configmod.ConfigError) as e:
                configmod.from_mapping({"inbound": {key: bad}})
            self.assertIn(f"inbound.{key}", str(e.exception))


class ResolverTests(SynchronousTestCase):
    def test_answersCachedForTheirTTL(self):
        """A second question within the TTL is answered from the cache; after it, upstream is asked again."""
        upstream = ZoneResolver({"a.test": [("A", "192.0.2.1")]})
        clock = Clock()
        resolver = dnsresolver.CachingResolver(upstream, clock)
        verifyObject(IResolver, resolver)
        for _ in range(2):
            answers = self.successResultOf(resolver.lookupAddress("a.test"))[0]
            self.assertEqual(answers[0].payload.dottedQuad(), "192.0.2.1")
        self.assertEqual(upstream.queries, [("a.test", dns.A)])
        clock.advance(61)
        self.successResultOf(resolver.lookupAddress("a.test"))
        self.assertEqual(len(upstream.queries), 2)

    def test_nxdomainCachedBriefly(self):
        """NXDOMAIN without SOA is kept for NEGATIVE_TTL, then asked again; SERVFAIL is never kept."""
        upstream = ZoneResolver({"broken.test": ["SERVFAIL"]})
        clock = Clock()
        resolver = dnsresolver.CachingResolver(upstream, clock)
        for _ in range(2):
            self.failureResultOf(resolver.lookupAddress("nx.test"), DNSNameError)
            self.failureResultOf(resolver.lookupAddress("broken.test"))
        self.assertEqual(upstream.queries, [("nx.test", dns.A), ("broken.test", dns.A), ("broken.test", dns.A)])
        clock.advance(dnsresolver.NEGATIVE_TTL)
        self.failureResultOf(resolver.lookupAddress("nx.test"), DNSNameError)
        self.assertEqual(len(upstream.queries), 4)

    def test_negativeTTLFromSOA(self):
        """RFC 2308 section 5: the lesser of the SOA record's TTL and its MINIMUM."""
        soa = dns.RRHeader(b"test", dns.SOA, dns.IN, 300, dns.Record_SOA(minimum=30))
        message = dns.Message()
        message.authority = [soa]
        self.assertEqual(dnsresolver.negative_ttl(DNSNameError(message)), 30)
        self.assertEqual(dnsresolver.negative_ttl(DNSNameError("nx.test")), dnsresolver.NEGATIVE_TTL)

    def test_nameserversFallBack(self):
        """[dns] nameservers first, then relay.nameservers."""
        cfg = configmod.from_mapping({"relay": {"nameservers": ["127.0.0.1:5300"]}})
        self.assertEqual(dnsresolver.nameservers(cfg), [("127.0.0.1", 5300)])
        cfg = configmod.from_mapping(
            {"relay": {"nameservers": ["127.0.0.1:5300"]}, "dns": {"nameservers": ["127.0.0.2"]}}
        )
        self.assertEqual(dnsresolver.nameservers(cfg), [("127.0.0.2", 53)])
